//! The consistency check against a real server (SQLite): a log paged over more than one
//! `GET …/events` page, trimmed by retention, is judged consistent, and the digest it reports
//! is the server's.

use zerodrop_client::{HttpClient, Verdict, check_stream};
use zerodrop_testkit::server::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_log_longer_than_a_page_is_consistent() {
    let s = TestServer::with(|c| c.retention.max_events = 1100).await;
    let http = HttpClient::new(&s.url, Some(s.creds.api_key.clone())).unwrap();

    let empty = check_stream(&http, "cc:empty", 3).await.unwrap();
    assert_eq!(
        empty.verdict,
        Verdict::Consistent {
            count: 0,
            hash: "0".repeat(64)
        }
    );

    for i in 0..1203u32 {
        let data = format!(r#"{{"i":{i},"s":"ünï {i}","n":{{"a":[{i},null]}}}}"#);
        http.publish("cc:1", &data, None).await.unwrap();
    }
    let c = check_stream(&http, "cc:1", 3).await.unwrap();
    // Trimmed in steps of 1100/64 = 17: to 1084 events at seq 1101, 1118, …, 1203.
    assert_eq!((c.info.first_seq, c.info.head_seq), (120, 1203));
    assert_eq!(
        c.verdict,
        Verdict::Consistent {
            count: 1084,
            hash: c.info.hash.clone()
        }
    );
    assert_eq!(c.info.hash.len(), 64);
    assert_ne!(c.info.hash, "0".repeat(64));
}
