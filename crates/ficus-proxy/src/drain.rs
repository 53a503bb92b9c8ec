//! The watch an accept loop keeps on the client connections it accepted, for
//! the drain: when it closes, every connection is told to finish the request
//! it is serving and close, and the workers wait until all of them have.
//!
//! hyper-util's `GracefulShutdown` does the same through a `watch` channel
//! whose change future every connection polls each time it is polled: some
//! 300 instructions a request (callgrind, issue 22), for a signal that comes
//! once in a process's life. Here a poll costs one atomic load and one waker
//! comparison; the lock is taken when a connection opens, when its task's
//! waker first registers (or changes), when it ends, and at the close.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// One listener's connections, watched for the drain.
#[derive(Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Set once, by [`Drain::close`]; read on every poll of every connection.
    closing: AtomicBool,
    state: Mutex<State>,
    /// Notified when the last watched connection ends.
    all_ended: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// The waker of each open connection's task that has been polled, by the
    /// connection's key: woken at the close.
    wakers: HashMap<u64, Waker>,
    open: usize,
    next_key: u64,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The lock guards plain bookkeeping that no panic leaves half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells every watched connection to close.
    fn tell_all(&self) {
        // Set before the wakers are taken: a connection that registers after
        // this takes the lock sees the flag when it looks again
        // (`Watch::poll_close`).
        self.closing.store(true, Ordering::SeqCst);
        // Taken out under the lock, woken (and dropped) after it: a waker
        // may be the last reference to a task whose watch locks it too.
        let wakers: Vec<Waker> = self.state().wakers.drain().map(|(_, w)| w).collect();
        for waker in wakers {
            waker.wake();
        }
    }
}

/// A drain dropped without [`Drain::close`] (its accept task ended
/// early) still tells its connections to close, as hyper-util's watch did
/// when its sender went away; nobody waits for them.
impl Drop for Drain {
    fn drop(&mut self) {
        if !self.inner.closing.load(Ordering::SeqCst) {
            self.inner.tell_all();
        }
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Watches one connection: counted open until the returned watch drops.
    /// Made when the connection is accepted, before its task first runs, so
    /// that a close that comes first still finds it.
    pub fn watch(&self) -> Watch {
        let mut state = self.inner.state();
        state.open += 1;
        let key = state.next_key;
        state.next_key += 1;
        Watch {
            inner: Arc::clone(&self.inner),
            key,
            waker: None,
            told: false,
        }
    }

    /// How many watched connections are open.
    pub fn open(&self) -> usize {
        self.inner.state().open
    }

    /// Tells every watched connection to close once its request ends, and
    /// waits until all have ended.
    pub async fn close(self) {
        self.inner.tell_all();
        loop {
            let ended = self.inner.all_ended.notified();
            tokio::pin!(ended);
            // Registered before the count is read, so an end in between is
            // not missed.
            ended.as_mut().enable();
            if self.inner.state().open == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// One connection's part of a [`Drain`].
pub struct Watch {
    inner: Arc<Inner>,
    key: u64,
    /// The waker registered for this connection's task, kept to see whether a
    /// later poll comes with the same one.
    waker: Option<Waker>,
    /// Whether [`Watch::poll_close`] has already said to close.
    told: bool,
}

impl Watch {
    /// Called on every poll of the connection: true once, when the drain has
    /// closed, so that the caller tells its connection to finish and close.
    pub fn poll_close(&mut self, cx: &Context<'_>) -> bool {
        if self.told {
            return false;
        }
        if !self.inner.closing.load(Ordering::SeqCst) {
            if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return false;
            }
            let waker = cx.waker().clone();
            let replaced = self.inner.state().wakers.insert(self.key, waker.clone());
            // Dropped after the lock, for the reason `Inner::tell_all` gives.
            drop(replaced);
            self.waker = Some(waker);
            // The close may have taken the wakers between the look above and
            // the registration: looked at again, after it.
            if !self.inner.closing.load(Ordering::SeqCst) {
                return false;
            }
        }
        self.told = true;
        true
    }

    /// Drives `conn` to its end, calling `close` on it once when the drain
    /// closes. A future that holds the connection in place: an `async fn`
    /// would move it again (a connection's future is kilobytes, copied once
    /// more for each connection).
    pub fn serve<C: Future, F: FnMut(Pin<&mut C>)>(self, conn: C, close: F) -> Serve<C, F> {
        Serve {
            conn,
            watch: self,
            close,
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection served under a [`Watch`].
    pub struct Serve<C, F> {
        #[pin]
        conn: C,
        watch: Watch,
        close: F,
    }
}

impl<C: Future, F: FnMut(Pin<&mut C>)> Future for Serve<C, F> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if this.watch.poll_close(cx) {
            (this.close)(this.conn.as_mut());
        }
        this.conn.poll(cx)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut state = self.inner.state();
        let removed = state.wakers.remove(&self.key);
        state.open -= 1;
        let last = state.open == 0;
        drop(state);
        // After the lock, for the reason `Inner::tell_all` gives.
        drop(removed);
        if last {
            self.inner.all_ended.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A connection that ends only after it has been told to close and then
    /// polled again, counting the times it was told.
    struct Conn {
        told: Arc<AtomicUsize>,
    }

    impl Future for Conn {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
            if self.told.load(Ordering::SeqCst) > 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    fn spawn_conn(drain: &Drain) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let told = Arc::new(AtomicUsize::new(0));
        let watch = drain.watch();
        let conn = Conn {
            told: Arc::clone(&told),
        };
        let counter = Arc::clone(&told);
        let task = tokio::spawn(watch.serve(conn, move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        (told, task)
    }

    #[tokio::test]
    async fn close_tells_every_connection_once_and_waits_for_them() {
        let drain = Drain::new();
        // One polled (its waker registered) and one not yet run when the
        // close comes: both must be told.
        let (polled, a) = spawn_conn(&drain);
        tokio::task::yield_now().await;
        let (unpolled, b) = spawn_conn(&drain);
        assert_eq!(drain.open(), 2);
        drain.close().await;
        a.await.unwrap();
        b.await.unwrap();
        assert_eq!(polled.load(Ordering::SeqCst), 1);
        assert_eq!(unpolled.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_drain_dropped_unclosed_still_tells_its_connections() {
        let drain = Drain::new();
        let (told, task) = spawn_conn(&drain);
        tokio::task::yield_now().await;
        drop(drain);
        task.await.unwrap();
        assert_eq!(told.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn close_with_nothing_open_returns() {
        Drain::new().close().await;
    }

    #[tokio::test]
    async fn a_connection_that_ended_before_the_close_is_not_waited_for() {
        let drain = Drain::new();
        let (_told, task) = spawn_conn(&drain);
        tokio::task::yield_now().await;
        // Its task ends (here, aborted) and the watch drops with it.
        task.abort();
        let _ = task.await;
        assert_eq!(drain.open(), 0);
        drain.close().await;
    }
}
