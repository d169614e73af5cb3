//! `trusted_proxies`: which client an X-Forwarded-For names. Only a request whose connection
//! comes from a trusted proxy has its field read at all; the field is then walked from the
//! right, each hop that is itself a trusted proxy skipped, and the first that is not is the
//! client (nginx's `real_ip_recursive`, Envoy's trusted CIDRs). Whatever a client writes
//! to the left of its own address is never believed: it could write anything there.

use super::route::Cidr;
use std::net::{IpAddr, Ipv4Addr};

/// Hops looked at, at most: a proxy chain is a few hops long; a field of thousands is an
/// attack on the walk, and its 33rd hop from the right is as good an answer as any.
const MAX_HOPS: usize = 32;

/// The networks of `trusted_proxies`.
pub struct TrustedProxies(Box<[Cidr]>);

impl TrustedProxies {
    /// None when the list is empty: X-Forwarded-For is then never read.
    pub fn build(cidrs: &[String]) -> Result<Option<TrustedProxies>, String> {
        if cidrs.is_empty() {
            return Ok(None);
        }
        let nets = cidrs
            .iter()
            .map(|c| Cidr::parse(c).map_err(|e| format!("trusted_proxies {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(TrustedProxies(nets.into())))
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client of a request that came from `peer` with these X-Forwarded-For fields (in
    /// the order they came). A hop that is not an address ends the walk: the client is then
    /// the trusted hop that handed it over.
    pub fn client<'a>(
        &self,
        peer: IpAddr,
        fields: impl DoubleEndedIterator<Item = &'a [u8]>,
    ) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        let mut hops = 0;
        for field in fields.rev() {
            for hop in field.rsplit(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if hop.is_empty() {
                    continue;
                }
                let Some(ip) = parse_hop(hop) else {
                    return client;
                };
                client = ip;
                hops += 1;
                if !self.trusts(ip) || hops == MAX_HOPS {
                    return client;
                }
            }
        }
        client
    }
}

/// A hop as proxies write them: `1.2.3.4`, `2001:db8::1`, and with a port `1.2.3.4:5678` or
/// `[2001:db8::1]:5678`.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(hop).ok()?;
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(bracketed) = text.strip_prefix('[') {
        return bracketed.split_once(']')?.0.parse().ok();
    }
    let (v4, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    v4.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        let nets: Vec<String> = nets.iter().map(|s| s.to_string()).collect();
        TrustedProxies::build(&nets).unwrap().unwrap()
    }

    fn client(t: &TrustedProxies, peer: &str, fields: &[&str]) -> String {
        t.client(peer.parse().unwrap(), fields.iter().map(|f| f.as_bytes()))
            .to_string()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_writes() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(client(&t, "192.0.2.9", &["10.0.0.1"]), "192.0.2.9");
        assert_eq!(client(&t, "192.0.2.9", &[]), "192.0.2.9");
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let t = trusted(&["10.0.0.0/8", "2001:db8::/32"]);
        assert_eq!(client(&t, "10.0.0.2", &["198.51.100.7"]), "198.51.100.7");
        // a spoofed left part is not believed past the first untrusted hop
        assert_eq!(
            client(&t, "10.0.0.2", &["6.6.6.6, 198.51.100.7, 10.1.1.1"]),
            "198.51.100.7"
        );
        // several fields are one list, in order
        assert_eq!(
            client(
                &t,
                "10.0.0.2",
                &["6.6.6.6", "198.51.100.7", "10.1.1.1 , 2001:db8::5"]
            ),
            "198.51.100.7"
        );
        // every hop trusted: the left-most one
        assert_eq!(client(&t, "10.0.0.2", &["10.9.9.9, 10.1.1.1"]), "10.9.9.9");
        // nothing forwarded: the peer itself
        assert_eq!(client(&t, "10.0.0.2", &[]), "10.0.0.2");
        assert_eq!(client(&t, "10.0.0.2", &[" , "]), "10.0.0.2");
    }

    #[test]
    fn hops_with_ports_and_brackets_and_garbage() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            client(&t, "10.0.0.2", &["198.51.100.7:4711"]),
            "198.51.100.7"
        );
        assert_eq!(
            client(&t, "10.0.0.2", &["[2001:db8::7]:443"]),
            "2001:db8::7"
        );
        assert_eq!(client(&t, "10.0.0.2", &["2001:db8::7"]), "2001:db8::7");
        // not an address: the trusted hop that passed it on is the client
        assert_eq!(client(&t, "10.0.0.2", &["unknown, 10.3.3.3"]), "10.3.3.3");
        assert_eq!(
            client(&t, "10.0.0.2", &["198.51.100.7, _hidden"]),
            "10.0.0.2"
        );
    }

    #[test]
    fn a_long_field_is_walked_a_bounded_way() {
        let t = trusted(&["10.0.0.0/8"]);
        // the untrusted hop at the far left is never reached: the walk stops after 32 hops
        let long = format!("198.51.100.7,{}", vec!["10.0.0.1"; 1000].join(","));
        assert_eq!(client(&t, "10.0.0.2", &[long.as_str()]), "10.0.0.1");
        let short = format!("198.51.100.7,{}", vec!["10.0.0.1"; 31].join(","));
        assert_eq!(client(&t, "10.0.0.2", &[short.as_str()]), "198.51.100.7");
    }

    #[test]
    fn ipv4_mapped_peers_and_bad_networks() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            client(&t, "::ffff:10.0.0.2", &["198.51.100.7"]),
            "198.51.100.7"
        );
        assert!(TrustedProxies::build(&[]).unwrap().is_none());
        let err = TrustedProxies::build(&["10.0.0.0/33".to_string()])
            .err()
            .unwrap();
        assert!(err.starts_with("trusted_proxies"), "{err}");
    }
}
