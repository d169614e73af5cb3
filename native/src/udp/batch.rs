//! Batched datagram I/O: recvmmsg and sendmmsg over preallocated slots, so that one system call
//! moves up to a batch of datagrams and no datagram allocates.
//!
//! A slot holds a whole datagram (64 KiB), its peer address and one control message (the
//! destination address of a datagram that arrived on a wildcard bind, and the source address a
//! reply leaves from). The slots are one zeroed allocation: pages a small datagram never
//! touches are never made resident.

use socket2::SockAddr;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

/// The largest UDP payload (IPv4: 65,507 bytes; IPv6 without jumbograms: 65,527) fits a slot.
pub const SLOT: usize = 65536;

/// Room for one IP_PKTINFO or IPV6_PKTINFO control message (CMSG_SPACE of either is <= 40).
const CONTROL: usize = 64;

#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; CONTROL]);

pub struct Batch {
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    controls: Vec<Control>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Batch {
    pub fn new(slots: usize) -> Batch {
        // SAFETY: sockaddr_storage, mmsghdr and iovec are plain C data for which all zeroes is
        // a valid value.
        let mut b = Batch {
            bufs: vec![0u8; slots * SLOT],
            iovs: vec![unsafe { zeroed() }; slots],
            addrs: vec![unsafe { zeroed() }; slots],
            controls: vec![Control([0; CONTROL]); slots],
            hdrs: vec![unsafe { zeroed() }; slots],
        };
        // The vectors are never resized: these pointers stay valid for the batch's life, moves
        // of the Batch included (a Vec's heap buffer does not move with it).
        for i in 0..slots {
            b.iovs[i].iov_base = b.bufs[i * SLOT..].as_mut_ptr().cast();
            b.iovs[i].iov_len = SLOT;
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_control = b.controls[i].0.as_mut_ptr().cast();
        }
        b
    }

    pub fn slots(&self) -> usize {
        self.hdrs.len()
    }

    /// Receives up to `max` datagrams into slots `from..`, without waiting; `named`: record
    /// each sender's address and (with `control`) the packet-info control message. Returns how
    /// many arrived (an error of kind WouldBlock when none had).
    pub fn recv(
        &mut self,
        fd: RawFd,
        from: usize,
        max: usize,
        named: bool,
        control: bool,
    ) -> io::Result<usize> {
        let max = max.min(self.slots() - from);
        for i in from..from + max {
            self.iovs[i].iov_len = SLOT;
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_namelen = if named {
                size_of::<libc::sockaddr_storage>() as u32
            } else {
                0
            };
            h.msg_controllen = if control { CONTROL } else { 0 };
            h.msg_flags = 0;
        }
        // SAFETY: hdrs[from..from + max] point into this batch's own buffers, sized as set.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs[from..].as_mut_ptr(),
                max as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The datagram in slot `i` (as received, or as set up to send).
    pub fn payload(&self, i: usize) -> &[u8] {
        let len = self.hdrs[i].msg_len as usize;
        &self.bufs[i * SLOT..i * SLOT + len.min(SLOT)]
    }

    /// The sender of the datagram received in slot `i`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        let len = self.hdrs[i].msg_hdr.msg_namelen as usize;
        socket_addr(&self.addrs[i], len)
    }

    /// The address the datagram in slot `i` was sent to (from IP_PKTINFO / IPV6_PKTINFO).
    pub fn destination(&self, i: usize) -> Option<IpAddr> {
        let h = &self.hdrs[i].msg_hdr;
        // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed control messages.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                        let info = data.cast::<libc::in_pktinfo>().read_unaligned();
                        return Some(IpAddr::from(info.ipi_addr.s_addr.to_ne_bytes()));
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                        let info = data.cast::<libc::in6_pktinfo>().read_unaligned();
                        return Some(IpAddr::from(info.ipi6_addr.s6_addr));
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        None
    }

    /// Sets slot `i`, whose payload was received as a reply, to go to `to`, from `from` when
    /// the listening socket is bound to a wildcard address.
    pub fn address(&mut self, i: usize, to: SocketAddr, from: Option<IpAddr>) {
        let len = self.hdrs[i].msg_len as usize;
        self.iovs[i].iov_len = len;
        let to = SockAddr::from(to);
        let h = &mut self.hdrs[i].msg_hdr;
        // SAFETY: `to` is at most a sockaddr_storage, which the slot's storage is.
        unsafe {
            std::ptr::copy_nonoverlapping(
                to.as_ptr().cast::<u8>(),
                h.msg_name.cast::<u8>(),
                to.len() as usize,
            )
        };
        h.msg_namelen = to.len();
        h.msg_controllen = 0;
        if let Some(from) = from {
            // SAFETY: the control buffer holds CONTROL bytes, more than one pktinfo message.
            unsafe { set_source(h, from) };
        }
    }

    /// Sends slots `from..to` (set up by `address`) from `fd` in one sendmmsg; returns how many
    /// the kernel took.
    pub fn send(&mut self, fd: RawFd, from: usize, to: usize) -> io::Result<usize> {
        // SAFETY: hdrs[from..to] point into this batch's own buffers, sized as set.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs[from..].as_mut_ptr(),
                (to - from) as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The IPv4 or IPv6 address the kernel wrote into `s` (`len` bytes of it).
fn socket_addr(s: &libc::sockaddr_storage, len: usize) -> Option<SocketAddr> {
    let at = (s as *const libc::sockaddr_storage).cast::<u8>();
    match s.ss_family as i32 {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the storage holds a sockaddr_in (family and length checked).
            let a = unsafe { at.cast::<libc::sockaddr_in>().read_unaligned() };
            let ip = std::net::Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the storage holds a sockaddr_in6 (family and length checked).
            let a = unsafe { at.cast::<libc::sockaddr_in6>().read_unaligned() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes the IP_PKTINFO / IPV6_PKTINFO message that makes a reply leave from `from`.
///
/// # Safety
/// `h.msg_control` must point to at least CONTROL writable bytes, aligned for cmsghdr.
unsafe fn set_source(h: &mut libc::msghdr, from: IpAddr) {
    let (level, kind, len) = match from {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            size_of::<libc::in_pktinfo>(),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            size_of::<libc::in6_pktinfo>(),
        ),
    };
    h.msg_controllen = libc::CMSG_SPACE(len as u32) as usize;
    let c = libc::CMSG_FIRSTHDR(h);
    (*c).cmsg_level = level;
    (*c).cmsg_type = kind;
    (*c).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
    let data = libc::CMSG_DATA(c);
    match from {
        IpAddr::V4(ip) => {
            let mut info: libc::in_pktinfo = zeroed();
            info.ipi_spec_dst.s_addr = u32::from_ne_bytes(ip.octets());
            data.cast::<libc::in_pktinfo>().write_unaligned(info);
        }
        IpAddr::V6(ip) => {
            let mut info: libc::in6_pktinfo = zeroed();
            info.ipi6_addr.s6_addr = ip.octets();
            data.cast::<libc::in6_pktinfo>().write_unaligned(info);
        }
    }
}

/// Sends one datagram on a connected socket, without waiting.
pub fn send(fd: RawFd, payload: &[u8]) -> io::Result<()> {
    // SAFETY: payload is valid for its length.
    let n = unsafe {
        libc::send(
            fd,
            payload.as_ptr().cast(),
            payload.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_receives_and_replies_to_each_sender() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let clients: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&vec![i as u8; 1000 * (i + 1)], server.local_addr().unwrap())
                .unwrap();
        }
        let big = vec![7u8; 65507];
        clients[0]
            .send_to(&big, server.local_addr().unwrap())
            .unwrap();
        let mut batch = Batch::new(8);
        let fd = server.as_raw_fd();
        let n = batch.recv(fd, 0, 8, true, false).unwrap();
        assert_eq!(n, 4);
        for (i, c) in clients.iter().enumerate() {
            assert_eq!(batch.payload(i), &vec![i as u8; 1000 * (i + 1)][..]);
            assert_eq!(batch.source(i), Some(c.local_addr().unwrap()));
        }
        assert_eq!(batch.payload(3), &big[..], "64 KiB arrives whole");
        for i in 0..4 {
            let to = batch.source(i).unwrap();
            batch.address(i, to, None);
        }
        assert_eq!(batch.send(fd, 0, 4).unwrap(), 4);
        let mut buf = vec![0u8; SLOT];
        for (i, c) in clients.iter().enumerate() {
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!((n, from), (1000 * (i + 1), server.local_addr().unwrap()));
        }
        assert_eq!(clients[0].recv(&mut buf).unwrap(), 65507);
        let err = batch.recv(fd, 0, 8, true, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    /// On a wildcard bind the destination comes with each datagram, and a reply set to leave
    /// from it does (a client checks the address it hears from).
    #[test]
    fn a_wildcard_bind_replies_from_the_address_it_was_reached_at() {
        let server =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        server
            .bind(&"0.0.0.0:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let port = server.local_addr().unwrap().as_socket().unwrap().port();
        let one: libc::c_int = 1;
        // SAFETY: a valid int option.
        unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"q", ("127.0.0.3", port)).unwrap();
        let mut batch = Batch::new(2);
        let fd = server.as_raw_fd();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(batch.recv(fd, 0, 2, true, true).unwrap(), 1);
        let dst = batch.destination(0);
        assert_eq!(dst, Some("127.0.0.3".parse().unwrap()));
        batch.address(0, client.local_addr().unwrap(), dst);
        assert_eq!(batch.send(fd, 0, 1).unwrap(), 1);
        let mut buf = [0u8; 16];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((n, from), (1, format!("127.0.0.3:{port}").parse().unwrap()));
    }
}
