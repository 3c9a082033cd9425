//! Who a request is counted against: the client address Envoy computed, grouped by prefix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Parses Envoy's `source.address` property: `1.2.3.4:5678`, `[2001:db8::1]:5678`, or a bare
/// address. IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
pub fn parse_source_address(text: &str) -> Option<IpAddr> {
    let ip = match text.parse::<SocketAddr>() {
        Ok(socket) => socket.ip(),
        Err(_) => text.parse::<IpAddr>().ok()?,
    };
    Some(match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    })
}

/// The address with every bit after the prefix cleared, written as `address/prefix`: the
/// budget key of every client in that network.
pub fn group(ip: IpAddr, ipv4_prefix: u8, ipv6_prefix: u8) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let len = ipv4_prefix.min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            format!("{}/{len}", Ipv4Addr::from(v4.to_bits() & mask))
        }
        IpAddr::V6(v6) => {
            let len = ipv6_prefix.min(128);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            format!("{}/{len}", Ipv6Addr::from(v6.to_bits() & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> String {
        group(parse_source_address(text).unwrap(), 32, 64)
    }

    #[test]
    fn envoy_address_forms() {
        assert_eq!(key("10.1.2.3:5555"), "10.1.2.3/32");
        assert_eq!(key("10.1.2.3"), "10.1.2.3/32");
        assert_eq!(key("[2001:db8:1:2::7]:443"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:aaaa::7"), "2001:db8:1:2::/64");
        assert_eq!(key("[::ffff:10.1.2.3]:80"), "10.1.2.3/32", "mapped IPv4 is IPv4");
    }

    #[test]
    fn ipv6_neighbours_share_a_group_and_other_networks_do_not() {
        assert_eq!(key("[2001:db8:1:2::1]:1"), key("[2001:db8:1:2:ffff:ffff:ffff:ffff]:2"));
        assert_ne!(key("[2001:db8:1:2::1]:1"), key("[2001:db8:1:3::1]:1"));
        let ip = parse_source_address("2001:db8:1:2:3:4:5:6").unwrap();
        assert_eq!(group(ip, 32, 48), "2001:db8:1::/48");
        assert_eq!(group(ip, 32, 128), "2001:db8:1:2:3:4:5:6/128");
        assert_eq!(group(ip, 32, 0), "::/0");
    }

    #[test]
    fn ipv4_prefixes() {
        let ip = parse_source_address("192.168.77.200").unwrap();
        assert_eq!(group(ip, 24, 64), "192.168.77.0/24");
        assert_eq!(group(ip, 0, 64), "0.0.0.0/0");
    }

    #[test]
    fn garbage_is_not_an_address() {
        for bad in ["", "localhost:80", "1.2.3:4", "[::1", "1.2.3.4:99999", "envoy://internal"] {
            assert_eq!(parse_source_address(bad), None, "{bad}");
        }
    }
}
