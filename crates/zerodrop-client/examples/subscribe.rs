//! Follows one stream and prints every event once, in order, across server restarts, drains
//! and network drops; stops with the reason when the stream must be resynced.
//!
//! ```text
//! cargo run -p zerodrop-client --example subscribe -- <url> <connect-token> <stream> [after]
//! ```
//!
//! `url` is the server's base (`http://127.0.0.1:7700`, or several separated by commas: each
//! reconnect goes to the next). Without `after` it starts at the head (live only).

use zerodrop_client::{Client, ClientOptions, SubscribeOptions, SubscriptionError};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token, stream, rest @ ..] = args.as_slice() else {
        eprintln!("usage: subscribe <url>[,<url>…] <connect-token> <stream> [after]");
        std::process::exit(2);
    };
    let after = rest.first().map(|a| a.parse::<u64>()).transpose()?;
    let urls: Vec<&str> = url.split(',').collect();
    let client = Client::connect_with(&urls, token, ClientOptions::default()).await?;
    eprintln!("connected ({})", client.protocol());
    let mut sub = client.subscribe_with(
        stream,
        SubscribeOptions {
            after,
            epoch: None,
            ..Default::default()
        },
    );
    while let Some(item) = sub.next().await {
        match item {
            Ok(event) => {
                println!("{} {} {}", event.stream, event.seq, event.data.get());
                // Handled: only now may the event be acked.
                event.handled();
            }
            // Each of these means: resync from your own state, then subscribe again.
            Err(SubscriptionError::EpochChanged { epoch, .. }) => {
                eprintln!("the stream's log was recreated (epoch {epoch}): resync");
                break;
            }
            Err(SubscriptionError::ReplayWindowTrimmed {
                first_available_seq,
                ..
            }) => {
                eprintln!(
                    "missed events were trimmed (first available {first_available_seq:?}): resync"
                );
                break;
            }
            Err(e) => {
                eprintln!("subscription ended: {e} (code {})", e.code());
                break;
            }
        }
    }
    let p = sub.position();
    eprintln!("position: epoch {:?}, seq {}", p.epoch, p.seq);
    client.close().await;
    Ok(())
}
