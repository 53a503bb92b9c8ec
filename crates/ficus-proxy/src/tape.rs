//! The head of the request last sent on an upstream HTTP/1 connection, kept as
//! the bytes hyper wrote, for the rare attempt that must send it again.
//!
//! A safe read is sent again when its reused connection closes under it, or
//! when its upstream answers a 5xx or not in time and another may answer. Its
//! head is moved into the first attempt (hyper consumes it), so the second
//! needs a copy. Copying the header map before every attempt cost about 1,400
//! instructions a request (a clone, then a drop), 3 % of the proxy's whole
//! work, for a copy almost never used. The connection's writer
//! ([`crate::hyper_engine`]'s `Upstream`) instead keeps the head's bytes as
//! hyper writes them, a copy of about 300 bytes, and only a retry parses them
//! back into headers.
//!
//! The tape is armed for each request that may be sent again, before it is
//! handed to hyper; hyper's HTTP/1 client sends one request at a time on a
//! connection, and a connection goes back to the pool only once its last
//! request is done, so what the writer sees from arming on is that request.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};

use http::{HeaderMap, HeaderName, HeaderValue};

/// Nothing to keep: no request that may be sent again since the last head.
const EMPTY: u8 = 0;
/// A request that may be sent again was handed to hyper; none of it written.
const ARMED: u8 = 1;
/// Some of it written and kept, maybe not yet its whole head.
const RECORDING: u8 = 2;
/// Its whole head written and kept (and maybe some of its body).
const DONE: u8 = 3;

/// The most a tape keeps: more than any head hyper writes for this proxy
/// (the client's, at most `MAX_HEAD`, and the proxy's own headers).
const LIMIT: usize = 2 * crate::hyper_engine::MAX_HEAD;

/// One connection's tape, shared by its writer and its pool entry.
#[derive(Default)]
pub struct Tape {
    /// Outside the lock, so writes that keep nothing (bodies, requests that
    /// are never sent again) take no lock.
    state: AtomicU8,
    head: Mutex<Vec<u8>>,
}

impl Tape {
    /// The request about to be handed to hyper may be sent again: keep its
    /// head. Any other request leaves nothing to replay.
    pub fn arm(&self, keep: bool) {
        let want = if keep { ARMED } else { EMPTY };
        if self.state.load(Ordering::Relaxed) != want {
            self.state.store(want, Ordering::Release);
        }
    }

    /// Keeps the first `n` bytes of `bufs`, which the writer has handed on,
    /// until a head may have ended.
    ///
    /// No search for the head's end on this path, which every retryable
    /// request takes (searching for `\r\n\r\n` cost 320 instructions a
    /// request, as `\r` and `\n` are the commonest bytes of a head): hyper
    /// writes an HTTP/1 head in a buffer of its own, the first slice of a
    /// vectored write, so a slice that ends a blank line ends the head, or
    /// a body after it. The head's end is found by [`Tape::replay`]'s
    /// parse, on the rare retry.
    pub fn record(&self, bufs: &[IoSlice<'_>], mut n: usize) {
        let state = self.state.load(Ordering::Acquire);
        if state != ARMED && state != RECORDING {
            return;
        }
        let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        if state == ARMED {
            head.clear();
        }
        let mut next = RECORDING;
        for buf in bufs {
            if n == 0 {
                break;
            }
            let take = buf.len().min(n);
            n -= take;
            head.extend_from_slice(&buf[..take]);
            // A blank line's end can only follow the head's end or be it: no
            // header holds a line break.
            if head.ends_with(b"\r\n\r\n") || head.len() > LIMIT {
                next = DONE;
                break;
            }
        }
        self.state.store(next, Ordering::Release);
    }

    /// The headers of the head kept for the last request armed, or `None`
    /// when there is none (the request was not to be sent again, or hyper
    /// never wrote all its head).
    pub fn replay(&self) -> Option<HeaderMap> {
        let state = self.state.load(Ordering::Acquire);
        if state != RECORDING && state != DONE {
            return None;
        }
        let head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        parse_headers(&head)
    }
}

/// The headers of the request head that `bytes` begin with (a body may
/// follow it), names in lower case (a retry is sent them so, as before this
/// tape); `None` unless a whole head is there.
fn parse_headers(bytes: &[u8]) -> Option<HeaderMap> {
    let lines = memchr::memchr_iter(b'\n', bytes).count();
    let mut slots = vec![httparse::EMPTY_HEADER; lines];
    let mut req = httparse::Request::new(&mut slots);
    if !matches!(req.parse(bytes), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        headers.append(name, value);
    }
    Some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    /// Arms a tape (or not), writes `writes` (each a list of slices and how
    /// many of their bytes the writer took), and renders what a retry gets.
    fn check(keep: bool, writes: &[(&[&str], usize)], expect: Expect) {
        let tape = Tape::default();
        // A head of an earlier request, which must never be replayed for this one.
        tape.arm(true);
        tape.record(
            &[IoSlice::new(b"GET /old HTTP/1.1\r\nx-old: 1\r\n\r\n")],
            31,
        );
        tape.arm(keep);
        for (slices, n) in writes {
            let bufs: Vec<IoSlice<'_>> =
                slices.iter().map(|s| IoSlice::new(s.as_bytes())).collect();
            tape.record(&bufs, *n);
        }
        let got = match tape.replay() {
            None => "none".to_string(),
            Some(headers) => headers
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
                .collect::<Vec<_>>()
                .join("\n"),
        };
        expect.assert_eq(&got);
    }

    const HEAD: &str = "GET /a?b=1 HTTP/1.1\r\nHost: up\r\nX-Case: Kept\r\naccept: */*\r\naccept: text/html\r\n\r\n";

    #[test]
    fn a_head_written_whole_is_replayed_and_nothing_else_is() {
        check(
            true,
            &[(&[HEAD], HEAD.len())],
            expect![[r#"
                host: up
                x-case: Kept
                accept: */*
                accept: text/html"#]],
        );
        // Written in pieces, the end split between two writes.
        let cut = HEAD.len() - 2;
        check(
            true,
            &[(&[HEAD], 7), (&[&HEAD[7..]], cut - 7), (&[&HEAD[cut..]], 2)],
            expect![[r#"
                host: up
                x-case: Kept
                accept: */*
                accept: text/html"#]],
        );
        // A vectored write of the head and a body, as hyper writes them.
        check(
            true,
            &[(&[HEAD, "{\"a\":1}"], HEAD.len() + 7)],
            expect![[r#"
                host: up
                x-case: Kept
                accept: */*
                accept: text/html"#]],
        );
        // The head and a body in one slice, the body in two writes, the
        // last ending a blank line as a chunked body's last chunk does.
        let flat = format!("{HEAD}5\r\nhello\r\n0\r\n\r\n");
        check(
            true,
            &[
                (&[&flat], HEAD.len() + 3),
                (&[&flat[HEAD.len() + 3..]], flat.len()),
            ],
            expect![[r#"
                host: up
                x-case: Kept
                accept: */*
                accept: text/html"#]],
        );
        // Not armed: the earlier head is not this request's.
        check(false, &[(&[HEAD], HEAD.len())], expect!["none"]);
        // Armed, nothing written, or half a head: nothing to send again.
        check(true, &[], expect!["none"]);
        check(true, &[(&[HEAD], 20)], expect!["none"]);
        check(true, &[(&[HEAD], 0)], expect!["none"]);
    }
}
