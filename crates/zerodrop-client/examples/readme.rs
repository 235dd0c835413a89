//! The README's Rust snippet, as a program (`tests/newcomer.rs` holds the two to the same text):
//! prints every event of `room:1` from the first one, once and in order.
//!
//! ```text
//! TOKEN=$(zerodrop token --sub u1 --streams 'room:*') cargo run -p zerodrop-client --example readme
//! ```

use zerodrop_client::{Client, SubscribeOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let token = std::env::var("TOKEN")?; // the connect token from above
    let client = Client::connect("http://127.0.0.1:7700", &token).await?;
    // From the first event, as the browser snippet; without `after` it starts at the head.
    let after = SubscribeOptions {
        after: Some(0),
        epoch: None,
        ..Default::default()
    };
    let mut sub = client.subscribe_with("room:1", after);
    while let Some(item) = sub.next().await {
        let event = item?; // Err(SubscriptionError::…) says why the stream must resync
        println!("{} {}", event.seq, event.data.get());
        event.handled(); // only handled events are acked
    }
    Ok(())
}
