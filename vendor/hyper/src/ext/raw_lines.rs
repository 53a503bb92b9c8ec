//! Ficus's patch: header lines a user of the HTTP/1 client has written out
//! itself, sent after the request's own headers.

/// Header lines, each `name: value\r\n`, that hyper's HTTP/1 client writes
/// as they are after the headers of the request that carries them (as an
/// extension), before the blank line. Their writer vouches for them: hyper
/// does not look inside, so they must be whole lines of a valid name and
/// value, and none may frame the message (`Content-Length`,
/// `Transfer-Encoding`) or change the connection (`Connection`, `Upgrade`).
/// An HTTP/2 request ignores them.
///
/// For a proxy that adds the same few headers to every request it forwards,
/// writing them once costs less than hashing each into the request's
/// `HeaderMap` for hyper to write out again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawHeaderLines(pub Vec<u8>);
