//! Ficus's patch: what an HTTP/1 server saw in a request head as it was sent
//! that the parsed request no longer shows.

/// Why a request head must be refused, found in its bytes as they were sent:
/// a bare LF (a line end to this parser, but possibly part of a header value
/// to a proxy in front, so one request is read two ways), or both
/// `Content-Length` and `Transfer-Encoding` (the length is dropped and the body
/// read as chunked). The server still hands the request to its service, in
/// this extension, so that the service answers it (and the connection, as
/// with both framings, is not kept alive); it is the service's to refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawHeadRefusal(pub &'static str);

impl RawHeadRefusal {
    /// A line of the head (or an empty line before it) ends in a bare LF.
    pub const BARE_LF: RawHeadRefusal = RawHeadRefusal("a header line ends in a bare LF");
    /// The head carries both `Content-Length` and `Transfer-Encoding`.
    pub const BOTH_FRAMINGS: RawHeadRefusal =
        RawHeadRefusal("a request may not carry both content-length and transfer-encoding");
}

/// Whether `head` holds an LF not preceded by a CR.
pub(crate) fn has_bare_lf(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}
