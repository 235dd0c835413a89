//! The WebSocket frames of SPEC §4: the server's own types (`zerodrop_core::frames`), so this
//! SDK decodes exactly what the server encodes. A frame whose `type` this SDK does not know
//! becomes [`ServerFrame::Unknown`] and is ignored by callers (servers may add frame types).

pub use zerodrop_core::frames::{
    Ack, ClientFrame, ErrorFrame, EventFrame as Event, FrameError, Ping, PresenceAt, PresenceFrame,
    PresenceMember, Publish, Published, Reconnect, Refresh, RefreshAsk, Resume, ServerFrame,
    Subscribe, Subscribed, Token, Unsubscribe, Welcome,
};
