//! Backend selection and retries for one request, whatever the protocols: pick (affinity first,
//! then the pool's algorithm), wait in the queue when every backend is at `max_connections`,
//! try, and decide from how the try ended whether another backend may be tried.

use crate::balance::Pool;
use crate::config::MAX_TRIES;
use crate::h1::io::Deadline;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// Whether the client connection stays open after an exchange.
#[derive(PartialEq, Eq, Debug, Clone, Copy)]
pub enum Next {
    KeepAlive,
    Close,
}

/// How one attempt at a backend ended.
pub enum Attempt {
    /// The response went to the client; whether the client connection stays open.
    Done(Next),
    /// Nothing reached the client: try another backend if the request allows it, else answer
    /// the status.
    Failed { status: u16, retryable: bool },
    /// A kept-alive backend connection turned out closed before any response byte (the
    /// backend closed it while idle): worth one more try on a fresh connection.
    Stale,
    /// The client went away or the exchange broke after response bytes were sent.
    Broken,
}

/// How a request's tries ended.
pub enum Ended {
    /// A backend's response went to the client.
    Done(Next),
    /// The exchange broke after the client saw part of a response (or the client left).
    Broken,
    /// No backend answered: the session answers this status itself; `no_backend` when none
    /// could even be tried (counted by `record_no_backend`).
    Answer { status: u16, no_backend: bool },
}

/// One request as `run` drives it; implemented by each (client protocol, pool protocol) pair.
pub(crate) trait Tries {
    /// The pool, the request's hash key and the backend its affinity cookie names.
    fn target(&self) -> (&Arc<Pool>, u64, Option<usize>);
    fn outcome(&mut self) -> &mut super::Outcome;
    /// Waits for a backend below its `max_connections` (`queue_wait` on the request's timer).
    async fn queue_wait(&mut self, pool: &Pool, key: u64) -> Option<usize>;
    /// One try at backend `i` of the pool.
    async fn attempt(&mut self, i: usize) -> Attempt;
    /// The whole request is still at hand, so another backend can be sent it.
    fn replayable(&self) -> bool;
    /// The request may go to another backend after this one failed mid-way.
    fn idempotent(&self) -> bool;
    /// A kept-alive connection was found closed: the next try opens a new one.
    fn use_fresh_connection(&mut self);
}

/// Tries backends in turn until one answers or the retries are spent.
/// Only what must outlive an await
/// is kept here: a request's future carries it (idle RSS per connection is a target).
pub(crate) async fn run(t: &mut impl Tries) -> Ended {
    let (pool, key, pinned) = t.target();
    let pool = pool.clone();
    let tries = (pool.retries as usize + 1).min(MAX_TRIES) as u8;
    // u32: a request's future carries this array (idle RSS per connection is a target).
    let mut tried = [u32::MAX; MAX_TRIES];
    let mut n_tried = 0u8;
    let mut status = 503;
    let mut stale_retry = true;
    while n_tried < tries {
        let pick = match pinned {
            Some(i) if !tried[..n_tried as usize].contains(&(i as u32)) && pool.usable(i) => {
                Some(i)
            }
            _ => pool.select(key, &tried[..n_tried as usize]),
        };
        let i = match pick {
            Some(i) => i,
            None if n_tried == 0 && pool.queue.size > 0 && pool.only_busy() => {
                match t.queue_wait(&pool, key).await {
                    Some(i) => i,
                    None => break,
                }
            }
            None => break,
        };
        tried[n_tried as usize] = i as u32;
        n_tried += 1;
        let outcome = t.outcome();
        outcome.backend = pool.backends[i].slot;
        outcome.retries = n_tried - 1;
        if let Some(log) = outcome.log.as_deref_mut() {
            log.backend = Some(pool.backends[i].address.clone());
        }
        pool.backends[i].acquire();
        let result = t.attempt(i).await;
        release(&pool, i);
        match result {
            Attempt::Done(next) => return Ended::Done(next),
            Attempt::Broken => return Ended::Broken,
            Attempt::Stale if stale_retry && t.replayable() => {
                // Not the backend's fault: same choice again, on a new connection.
                stale_retry = false;
                t.use_fresh_connection();
                n_tried -= 1;
            }
            Attempt::Stale => {
                status = 502;
                if !t.idempotent() {
                    break;
                }
            }
            Attempt::Failed {
                status: s,
                retryable,
            } => {
                status = s;
                if !retryable {
                    break;
                }
            }
        }
    }
    t.outcome().status = status;
    Ended::Answer {
        status,
        no_backend: n_tried == 0,
    }
}

/// Releases a backend after a request; wakes a queued request if the backend is capped.
fn release(pool: &Pool, i: usize) {
    pool.backends[i].release();
    if pool.settings[i].max_connections > 0 && pool.queued.load(Relaxed) > 0 {
        pool.slot_freed.notify_one();
    }
}

/// Waits for a backend below its `max_connections` (HAProxy's queue); None when the queue is
/// full or the wait times out.
pub(crate) async fn queue_wait(
    pool: &Pool,
    key: u64,
    deadline: &mut Deadline<'_>,
) -> Option<usize> {
    if pool.queued.fetch_add(1, Relaxed) >= pool.queue.size {
        pool.queued.fetch_sub(1, Relaxed);
        return None;
    }
    deadline.set(Duration::from_millis(pool.queue.timeout_ms.max(1)));
    let picked = loop {
        let mut notified = pin!(pool.slot_freed.notified());
        notified.as_mut().enable();
        if let Some(i) = pool.select(key, &[]) {
            break Some(i);
        }
        let expired = poll_fn(|cx| {
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            deadline.poll_expired(cx).map(|_| true)
        })
        .await;
        if expired {
            break pool.select(key, &[]);
        }
    };
    pool.queued.fetch_sub(1, Relaxed);
    picked
}
