//! End-to-end encrypted events: the publisher seals, the server stores and forwards
//! ciphertext it cannot read, the subscriber opens.
//!
//! ```text
//! cargo run -p zerodrop-client --example encrypted -- <url> <api-key> <connect-token> <stream>
//! ```
//!
//! The group key here is fixed for the example; a real application distributes its keys
//! itself and hands them to the SDK with `add_key`.

use std::time::Duration;

use zerodrop_client::{Client, HttpClient, SubscribeOptions};

const KID: &str = "example-1";
const KEY: [u8; 32] = *b"an example key, never use it....";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, api_key, token, stream] = args.as_slice() else {
        eprintln!("usage: encrypted <url> <api-key> <connect-token> <stream>");
        std::process::exit(2);
    };
    let client = Client::connect(url, token).await?;
    client.add_key(KID, &KEY)?;
    client.set_publish_key(KID)?;

    let http = HttpClient::new(url, Some(api_key.clone()))?;
    let head = http.stream_info(stream).await?.head_seq;
    let mut sub = client.subscribe_with(
        stream,
        SubscribeOptions {
            after: Some(head),
            epoch: None,
            ..Default::default()
        },
    );
    let sealed = client.seal(stream, r#"{"text":"meet at noon"}"#)?;
    let published = http.publish(stream, &sealed, None).await?;
    println!("stored as: {sealed}");

    let event = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await?
        .ok_or("the subscription ended")??;
    assert_eq!(event.seq, published.seq);
    println!(
        "received seq {}: {} (encrypted: {}, kid: {:?})",
        event.seq,
        event.data.get(),
        event.encrypted,
        event.kid
    );
    event.handled();
    client.close().await;
    Ok(())
}
