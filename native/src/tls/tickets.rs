//! Session ticket keys that can leave the process: a binary upgrade hands them to the new
//! process, so a ticket issued before the upgrade still resumes after it. rustls' own ticketer
//! keeps its keys private, hence this one; it rotates the same way (a new key every 6 hours,
//! the previous one still decrypts), with AES-256-GCM from aws-lc-rs.
//!
//! A ticket is `key name (16) | nonce (12) | ciphertext and tag`. Keys live behind an
//! arc-swap: a handshake loads them without a lock; the first handshake after the rotation
//! time swaps in a new set.

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use rustls::server::ProducesTickets;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A key is used to issue tickets for this long, then decrypts for as long again.
const ROTATE_S: u64 = 6 * 60 * 60;
const NAME_LEN: usize = 16;
const KEY_LEN: usize = 32;
/// One key in the exported form: name, key, creation time (big-endian seconds).
const EXPORTED_LEN: usize = NAME_LEN + KEY_LEN + 8;
const EXPORT_VERSION: u8 = 1;

struct TicketKey {
    name: [u8; NAME_LEN],
    secret: [u8; KEY_LEN],
    created: u64,
    aead: LessSafeKey,
}

impl TicketKey {
    fn new(name: [u8; NAME_LEN], secret: [u8; KEY_LEN], created: u64) -> Option<Self> {
        let unbound = UnboundKey::new(&AES_256_GCM, &secret).ok()?;
        Some(TicketKey {
            name,
            secret,
            created,
            aead: LessSafeKey::new(unbound),
        })
    }

    fn random(created: u64) -> Option<Self> {
        let mut name = [0u8; NAME_LEN];
        let mut secret = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut name).ok()?;
        aws_lc_rs::rand::fill(&mut secret).ok()?;
        TicketKey::new(name, secret, created)
    }
}

struct KeySet {
    current: TicketKey,
    previous: Option<TicketKey>,
}

/// The process's ticket keys (see the module doc).
pub struct TicketKeys {
    keys: ArcSwap<KeySet>,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketKeys")
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TicketKeys {
    pub fn new() -> Result<Self, String> {
        let current = TicketKey::random(now_s()).ok_or("cannot make TLS ticket keys")?;
        Ok(TicketKeys {
            keys: ArcSwap::from_pointee(KeySet {
                current,
                previous: None,
            }),
        })
    }

    /// Keys exported by another process's `export` (the newest first).
    pub fn import(bytes: &[u8]) -> Result<Self, String> {
        let bad = || "ticket keys: not an exported key set".to_string();
        let (&version, rest) = bytes.split_first().ok_or_else(bad)?;
        if version != EXPORT_VERSION || rest.is_empty() || rest.len() % EXPORTED_LEN != 0 {
            return Err(bad());
        }
        let mut keys = rest.chunks(EXPORTED_LEN).map(|k| {
            let name = k[..NAME_LEN].try_into().ok()?;
            let secret = k[NAME_LEN..NAME_LEN + KEY_LEN].try_into().ok()?;
            let created = u64::from_be_bytes(k[NAME_LEN + KEY_LEN..].try_into().ok()?);
            TicketKey::new(name, secret, created)
        });
        let current = keys.next().flatten().ok_or_else(bad)?;
        let previous = keys.next().flatten();
        Ok(TicketKeys {
            keys: ArcSwap::from_pointee(KeySet { current, previous }),
        })
    }

    /// The keys in use, for the next process: version, then each key (newest first).
    pub fn export(&self) -> Vec<u8> {
        let set = self.keys.load();
        let mut out = vec![EXPORT_VERSION];
        for key in std::iter::once(&set.current).chain(set.previous.as_ref()) {
            out.extend_from_slice(&key.name);
            out.extend_from_slice(&key.secret);
            out.extend_from_slice(&key.created.to_be_bytes());
        }
        out
    }

    /// The set to use now, rotated first if the current key is due (a lost race to rotate
    /// just means another handshake did it).
    fn current_set(&self, now: u64) -> Arc<KeySet> {
        let set = self.keys.load_full();
        if now.saturating_sub(set.current.created) < ROTATE_S {
            return set;
        }
        let Some(fresh) = TicketKey::random(now) else {
            return set;
        };
        let previous = TicketKey::new(set.current.name, set.current.secret, set.current.created);
        let rotated = Arc::new(KeySet {
            current: fresh,
            previous,
        });
        let _ = self.keys.compare_and_swap(&set, rotated);
        self.keys.load_full()
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        ROTATE_S as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let set = self.current_set(now_s());
        let key = &set.current;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.name),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NAME_LEN + NONCE_LEN {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let now = now_s();
        let set = self.current_set(now);
        let key = std::iter::once(&set.current)
            .chain(set.previous.as_ref())
            .find(|k| k.name == name && now.saturating_sub(k.created) < 2 * ROTATE_S)?;
        let mut buf = sealed.to_vec();
        let plain = key
            .aead
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(&key.name),
                &mut buf,
            )
            .ok()?;
        let len = plain.len();
        buf.truncate(len);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_round_trips_and_a_tampered_one_does_not() {
        let keys = TicketKeys::new().unwrap();
        let ticket = keys.encrypt(b"session state").unwrap();
        assert_eq!(keys.decrypt(&ticket).unwrap(), b"session state");
        let mut tampered = ticket.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(keys.decrypt(&tampered).is_none());
        assert!(keys.decrypt(&ticket[..20]).is_none());
    }

    #[test]
    fn exported_keys_decrypt_the_old_processs_tickets() {
        let old = TicketKeys::new().unwrap();
        let ticket = old.encrypt(b"resume me").unwrap();
        let new = TicketKeys::import(&old.export()).unwrap();
        assert_eq!(new.decrypt(&ticket).unwrap(), b"resume me");
        let other = TicketKeys::new().unwrap();
        assert!(other.decrypt(&ticket).is_none());
    }

    #[test]
    fn rotation_keeps_the_previous_key_for_one_more_period() {
        let keys = TicketKeys::new().unwrap();
        let ticket = keys.encrypt(b"x").unwrap();
        let created = keys.keys.load().current.created;
        let rotated = keys.current_set(created + ROTATE_S);
        assert!(rotated.previous.as_ref().unwrap().name == keys_name(&ticket));
        assert_ne!(rotated.current.name, keys_name(&ticket));
        // Exported after rotation: both keys travel, newest first.
        let again = TicketKeys::import(&keys.export()).unwrap();
        assert_eq!(again.keys.load().current.name, rotated.current.name);
        assert_eq!(again.decrypt(&ticket).unwrap(), b"x");
    }

    #[test]
    fn garbage_is_not_a_key_set() {
        assert!(TicketKeys::import(b"").is_err());
        assert!(TicketKeys::import(&[1, 2, 3]).is_err());
        assert!(TicketKeys::import(&[9; 1 + EXPORTED_LEN]).is_err());
    }

    fn keys_name(ticket: &[u8]) -> [u8; NAME_LEN] {
        ticket[..NAME_LEN].try_into().unwrap()
    }
}
