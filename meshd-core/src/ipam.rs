//! Address allocation: every node, device and service of a network gets one host index `n`, which
//! maps to one IPv4 address (`cidr base + n`) and one IPv6 address (`ula prefix::n`).
//!
//! Pure arithmetic; the store keeps the ledger of which indexes are taken.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The two address ranges of a network and the mapping from host index to addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    v4: Ipv4Net,
    /// The /64 of the network's /48 ULA prefix (subnet 0) where hosts live.
    v6: Ipv6Net,
}

impl Pool {
    /// A pool over `v4` and the first /64 of the ULA /48 `ula48`.
    pub fn new(v4: Ipv4Net, ula48: Ipv6Net) -> Pool {
        let v6 = Ipv6Net::new(ula48.network(), 64).expect("64 is a valid IPv6 prefix length");
        Pool { v4, v6 }
    }

    /// The IPv4 range.
    pub fn v4(&self) -> Ipv4Net {
        self.v4
    }

    /// The IPv6 /64 hosts are numbered in.
    pub fn v6(&self) -> Ipv6Net {
        self.v6
    }

    /// The largest usable index: the IPv4 range without its network and broadcast addresses.
    pub fn max_index(&self) -> u32 {
        let hosts = 1u64 << (32 - self.v4.prefix_len());
        u32::try_from(hosts.saturating_sub(2)).unwrap_or(u32::MAX)
    }

    /// IPv4 address of host `index`.
    pub fn v4_of(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.v4.network()) + index)
    }

    /// IPv6 address of host `index`.
    pub fn v6_of(&self, index: u32) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.v6.network()) + u128::from(index))
    }

    /// The index an IPv4 address of this pool stands for, if it is a host address of the pool.
    pub fn index_of_v4(&self, ip: Ipv4Addr) -> Option<u32> {
        let offset = u32::from(ip).checked_sub(u32::from(self.v4.network()))?;
        (offset >= 1 && offset <= self.max_index()).then_some(offset)
    }

    /// The smallest index in 1..=max that is not in `taken`; `None` when the pool is exhausted.
    pub fn first_free(&self, taken: &BTreeSet<u32>) -> Option<u32> {
        let mut candidate = 1u32;
        for &t in taken.range(1..) {
            if t > candidate {
                break;
            }
            if t == candidate {
                candidate += 1;
            }
        }
        (candidate <= self.max_index()).then_some(candidate)
    }
}

/// A random RFC 4193 unique local /48: `fd` followed by a 40-bit random global ID.
pub fn random_ula48() -> Ipv6Net {
    let global_id: [u8; 5] = rand::random();
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&global_id);
    Ipv6Net::new(Ipv6Addr::from(octets), 48).expect("48 is a valid IPv6 prefix length")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(cidr: &str) -> Pool {
        Pool::new(cidr.parse().unwrap(), "fd12:3456:789a::/48".parse().unwrap())
    }

    #[test]
    fn maps_indexes_to_both_families() {
        let p = pool("10.77.0.0/16");
        assert_eq!(p.v4_of(1).to_string(), "10.77.0.1");
        assert_eq!(p.v6_of(1).to_string(), "fd12:3456:789a::1");
        assert_eq!(p.v4_of(256).to_string(), "10.77.1.0");
        assert_eq!(p.v6_of(256).to_string(), "fd12:3456:789a::100");
        assert_eq!(p.max_index(), 65534);
        assert_eq!(p.index_of_v4("10.77.1.0".parse().unwrap()), Some(256));
        assert_eq!(p.index_of_v4("10.77.0.0".parse().unwrap()), None);
        assert_eq!(p.index_of_v4("10.77.255.255".parse().unwrap()), None);
        assert_eq!(p.index_of_v4("10.78.0.1".parse().unwrap()), None);
    }

    #[test]
    fn fills_gaps_then_exhausts() {
        let p = pool("10.9.9.0/29");
        assert_eq!(p.max_index(), 6);
        let mut taken = BTreeSet::new();
        assert_eq!(p.first_free(&taken), Some(1));
        taken.extend([1, 2, 4]);
        assert_eq!(p.first_free(&taken), Some(3));
        taken.extend([3, 5, 6]);
        assert_eq!(p.first_free(&taken), None);
        taken.remove(&5);
        assert_eq!(p.first_free(&taken), Some(5));
    }

    #[test]
    fn ula_is_rfc4193() {
        let a = random_ula48();
        let b = random_ula48();
        assert_eq!(a.prefix_len(), 48);
        assert_eq!(a.network().octets()[0], 0xfd);
        assert_eq!(a.network().octets()[6..], [0u8; 10]);
        assert_ne!(a, b, "40 random bits should differ between two draws");
    }

    proptest! {
        #[test]
        fn first_free_is_the_smallest_untaken(taken in proptest::collection::btree_set(1u32..70, 0..70)) {
            let p = pool("10.0.0.0/25"); // max index 126
            let free = p.first_free(&taken).unwrap();
            prop_assert!(!taken.contains(&free));
            prop_assert!((1..free).all(|i| taken.contains(&i)));
            prop_assert!(p.network_contains(free));
        }

        #[test]
        fn addresses_stay_inside_the_ranges(prefix in 8u8..=30, index_seed in any::<u32>()) {
            let p = Pool::new(Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), prefix).unwrap().trunc(), "fd00:1:2::/48".parse().unwrap());
            let index = 1 + index_seed % p.max_index();
            prop_assert!(p.v4().contains(&p.v4_of(index)));
            prop_assert_ne!(p.v4_of(index), p.v4().broadcast());
            prop_assert!(p.v6().contains(&p.v6_of(index)));
            prop_assert_eq!(p.index_of_v4(p.v4_of(index)), Some(index));
        }
    }

    impl Pool {
        fn network_contains(&self, index: u32) -> bool {
            let ip = self.v4_of(index);
            self.v4.contains(&ip) && ip != self.v4.network() && ip != self.v4.broadcast()
        }
    }
}
