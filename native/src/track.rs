//! Which sockets each worker has open, so the control plane can close some of them without the
//! tasks that own them having to listen for it: the backend connections of a backend whose
//! drain timed out, and the idle keep-alive client connections at a stop or when their
//! listener is removed.
//!
//! Per worker (thread-local), so registering costs a slab insert and never a lock; only the
//! worker itself walks its table, when it handles a command. Closing means `shutdown(2)`: the
//! owning task wakes to EOF or an error and ends the way it would for a peer's close, freeing
//! everything on its usual path (the fd stays owned, and valid, until that task drops it).

use crate::balance::BackendState;
use crate::tables::ListenerEntry;
use slab::Slab;
use std::cell::RefCell;
use std::os::fd::RawFd;

enum Entry {
    /// A connection to a backend, by the backend's shared state (address only, never read),
    /// and the client connection it serves: both are shut down to end the exchange (the
    /// backend's side alone would look like a half-close to a relay, which waits for the
    /// client's).
    Upstream {
        fd: RawFd,
        client_fd: RawFd,
        backend: *const BackendState,
    },
    /// An http client connection waiting for a request, nothing of it read yet; `shut` once
    /// `close_idle_clients` sent it a FIN.
    IdleClient {
        fd: RawFd,
        listener: *const ListenerEntry,
        shut: bool,
    },
}

thread_local! {
    static OPEN: RefCell<Slab<Entry>> = const { RefCell::new(Slab::new()) };
}

/// Unregisters its socket when dropped (before the socket closes: declare it after the socket).
pub struct Tracked {
    key: usize,
}

impl Tracked {
    /// Whether `close_idle_clients` closed this idle client connection (its write side): what
    /// it sends from now on is to be read away, never served.
    pub fn was_shut(&self) -> bool {
        OPEN.with(|open| {
            matches!(
                open.borrow().get(self.key),
                Some(Entry::IdleClient { shut: true, .. })
            )
        })
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        OPEN.with(|open| {
            open.borrow_mut().try_remove(self.key);
        });
    }
}

/// Registers a connection to `backend` serving the client connection `client_fd`.
pub fn upstream(fd: RawFd, client_fd: RawFd, backend: &BackendState) -> Tracked {
    let key = OPEN.with(|open| {
        open.borrow_mut().insert(Entry::Upstream {
            fd,
            client_fd,
            backend: backend as *const _,
        })
    });
    Tracked { key }
}

/// Registers an http client connection of `listener` (an entry its task holds) for as long
/// as it waits for a request with nothing read.
pub fn idle_client(fd: RawFd, listener: &ListenerEntry) -> Tracked {
    let key = OPEN.with(|open| {
        open.borrow_mut().insert(Entry::IdleClient {
            fd,
            listener: listener as *const _,
            shut: false,
        })
    });
    Tracked { key }
}

fn shutdown(fd: RawFd) {
    // SAFETY: the fd is registered, so the task owning it has not closed it yet.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Shuts down this worker's connections to `backend`; returns how many.
pub fn close_backend(backend: &BackendState) -> usize {
    let target = backend as *const BackendState;
    OPEN.with(|open| {
        let open = open.borrow();
        let mut n = 0;
        for (_, e) in open.iter() {
            if let Entry::Upstream {
                fd,
                client_fd,
                backend,
            } = e
            {
                if *backend == target {
                    shutdown(*fd);
                    shutdown(*client_fd);
                    n += 1;
                }
            }
        }
        n
    })
}

/// Closes this worker's idle client connections whose listener `matches`; returns how many.
/// Closing sends a FIN (the write side only), so a request that crosses it on the wire is read
/// away by its task and the client sees a clean close, never a reset. One already waiting
/// unread is left to be served (its answer says `Connection: close`), as busy connections are.
pub fn close_idle_clients(matches: impl Fn(&ListenerEntry) -> bool) -> usize {
    OPEN.with(|open| {
        let mut open = open.borrow_mut();
        let mut n = 0;
        for (_, e) in open.iter_mut() {
            if let Entry::IdleClient { fd, listener, shut } = e {
                // SAFETY: the connection's task holds its listener entry while it is registered.
                if !*shut && matches(unsafe { &**listener }) && !has_unread_request(*fd) {
                    // SAFETY: the fd is registered, so its task has not closed it yet.
                    unsafe { libc::shutdown(*fd, libc::SHUT_WR) };
                    *shut = true;
                    n += 1;
                }
            }
        }
        n
    })
}

/// Whether bytes of a request wait unread on `fd` (a peek, which never blocks).
fn has_unread_request(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local on a registered, open fd.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::states;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    #[test]
    fn close_backend_shuts_down_only_that_backends_connections_and_their_clients() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let backends = states(&[1, 1]);
        let (up0, mut far0) = pair(&listener);
        let (client0, mut client_far0) = pair(&listener);
        let (up1, mut far1) = pair(&listener);
        let (client1, _client_far1) = pair(&listener);
        let t0 = upstream(up0.as_raw_fd(), client0.as_raw_fd(), &backends[0]);
        let _t1 = upstream(up1.as_raw_fd(), client1.as_raw_fd(), &backends[1]);
        assert_eq!(close_backend(&backends[0]), 1);
        let mut buf = [0u8; 1];
        assert_eq!(
            far0.read(&mut buf).unwrap(),
            0,
            "backend 0's connection got a FIN"
        );
        assert_eq!(
            client_far0.read(&mut buf).unwrap(),
            0,
            "and so did its client"
        );
        far1.set_nonblocking(true).unwrap();
        assert!(
            far1.read(&mut buf).is_err(),
            "backend 1's connection untouched"
        );
        drop(t0);
        assert_eq!(close_backend(&backends[0]), 0, "unregistered on drop");
    }
}
