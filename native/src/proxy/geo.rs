//! `[geoip].database`: the client's country for `country` route conditions, from a MaxMind DB
//! file (GeoLite2-Country, GeoIP2-Country or City, or one of your own made with mmdb-writer),
//! read whole into memory when the config is loaded or reloaded.
//!
//! A lookup walks the file's search tree (about 30 steps for an IPv4 address) and reads only
//! the `iso_code` it needs; it is made only for requests that reach a route with a `country`
//! condition.

use maxminddb::{PathElement, Reader};
use std::net::IpAddr;
use std::sync::Arc;

const COUNTRY: [PathElement<'static>; 2] =
    [PathElement::Key("country"), PathElement::Key("iso_code")];
/// Where MaxMind puts an address it places by its registration only.
const REGISTERED: [PathElement<'static>; 2] = [
    PathElement::Key("registered_country"),
    PathElement::Key("iso_code"),
];

/// An ISO 3166-1 alpha-2 code, upper case.
pub type CountryCode = [u8; 2];

pub struct GeoDb(Reader<Vec<u8>>);

impl GeoDb {
    /// Reads and checks `path`; Err names what is wrong with it.
    pub fn open(path: &str) -> Result<Arc<GeoDb>, String> {
        let reader =
            Reader::open_readfile(path).map_err(|e| format!("geoip.database {path:?}: {e}"))?;
        Ok(Arc::new(GeoDb(reader)))
    }

    /// The country of `ip`; None when the database does not place it.
    pub fn country(&self, ip: IpAddr) -> Option<CountryCode> {
        // An IPv4 client on a dual-stack listener shows as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let found = self.0.lookup(ip).ok()?;
        let code: Option<&str> = found.decode_path(&COUNTRY).ok().flatten();
        let code = code.or_else(|| found.decode_path(&REGISTERED).ok().flatten())?;
        parse_code(code)
    }
}

/// "de" or "DE" -> b"DE"; anything but two ASCII letters -> None.
pub fn parse_code(code: &str) -> Option<CountryCode> {
    match code.as_bytes() {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_two_letters() {
        assert_eq!(parse_code("de"), Some(*b"DE"));
        assert_eq!(parse_code("US"), Some(*b"US"));
        assert_eq!(parse_code("USA"), None);
        assert_eq!(parse_code("1A"), None);
        assert_eq!(parse_code(""), None);
    }

    #[test]
    fn a_file_that_is_not_a_database_names_itself() {
        let path = std::env::temp_dir().join(format!("fastlb-not-mmdb-{}", std::process::id()));
        std::fs::write(&path, b"not a database").unwrap();
        let err = GeoDb::open(path.to_str().unwrap()).err().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(err.starts_with("geoip.database"), "{err}");
        assert!(GeoDb::open("/nonexistent/geo.mmdb").is_err());
    }
}
