// The Durable Streams conformance suite, the documented programmatic way: the server under
// test is started by the Rust test, which passes its base URL (`http://127.0.0.1:PORT/ds`).
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

const baseUrl = process.env.DS_BASE_URL;
if (!baseUrl) throw new Error("DS_BASE_URL is not set");

runConformanceTests({ baseUrl, longPollTimeoutMs: 20_000 });
