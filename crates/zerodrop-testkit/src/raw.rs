//! HTTP/1.1 written byte for byte: the request target goes out exactly as given (no `..`
//! folding, no re-encoding, which every URL-parsing client does), for hostile-path tests.

use std::net::SocketAddr;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::WAIT;
use crate::http::Resp;

/// `GET <target>` to `addr` with `headers`, on a fresh connection that asks to be closed; the
/// answer read to its end (`Content-Length` or the close).
pub async fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {target}: no answer within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("GET {target}: {e}"));
    parse(&buf).unwrap_or_else(|| {
        panic!(
            "GET {target}: not an HTTP answer: {:?}",
            String::from_utf8_lossy(&buf)
        )
    })
}

fn parse(buf: &[u8]) -> Option<Resp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers = HeaderMap::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        headers.append(
            HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
            HeaderValue::from_str(v.trim()).ok()?,
        );
    }
    let body = &buf[end + 4..];
    let body = match headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        Some(n) => &body[..n.min(body.len())],
        None => body,
    };
    let text = String::from_utf8_lossy(body).into_owned();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Some(Resp {
        status,
        headers,
        text,
        json,
    })
}
