//! TLS session-ticket keys that several replicas can share, so a client resumes on any of
//! them.
//!
//! Until keys are installed (`[cluster]` fetches them from Redis), tickets are made and read
//! by rustls' own rotating ticketer, as without replicas. Installed keys (newest first)
//! then make every new ticket (AES-256-GCM: key name ‖ nonce ‖ sealed state ‖ tag) and any
//! of them opens one; tickets of the local ticketer still open until it rotates them away.
//! Keys are replaced as a whole, so a key dropped from the shared ring stops opening
//! tickets here too (forward secrecy rests on that erasure, as with rustls' rotation).

use std::sync::{Arc, OnceLock, RwLock};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use rustls::server::ProducesTickets;

/// Length of a key's name, the first bytes of every ticket it seals.
pub const NAME_LEN: usize = 16;
/// Length of a key's secret.
pub const SECRET_LEN: usize = 32;
/// Tickets longer than this are not opened (ours are a few hundred bytes).
const MAX_TICKET: usize = 4096;

/// One key as the cluster shares it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial {
    pub name: [u8; NAME_LEN],
    pub secret: [u8; SECRET_LEN],
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log.
        write!(f, "KeyMaterial({})", hex(&self.name))
    }
}

struct Key {
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
}

/// The process-wide ticketer of listeners without client certificates.
pub struct SharedTicketer {
    local: Arc<dyn ProducesTickets>,
    /// Installed keys, newest first; empty until installed.
    keys: RwLock<Vec<Key>>,
    lifetime: u32,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer")
            .field("keys", &self.installed())
            .finish()
    }
}

impl SharedTicketer {
    pub fn new(lifetime_secs: u32) -> Result<SharedTicketer, String> {
        Ok(SharedTicketer {
            local: rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())?,
            keys: RwLock::new(Vec::new()),
            lifetime: lifetime_secs,
        })
    }

    /// Replaces the installed keys (newest first). Returns whether they changed.
    pub fn install(&self, keys: &[KeyMaterial]) -> bool {
        let same = {
            let now = self.keys.read().expect("keys lock");
            now.len() == keys.len() && now.iter().zip(keys).all(|(a, b)| a.name == b.name)
        };
        if same {
            return false;
        }
        let built: Vec<Key> = keys
            .iter()
            .filter_map(|k| {
                let unbound = UnboundKey::new(&AES_256_GCM, &k.secret).ok()?;
                Some(Key {
                    name: k.name,
                    aead: LessSafeKey::new(unbound),
                })
            })
            .collect();
        *self.keys.write().expect("keys lock") = built;
        true
    }

    /// How many keys are installed (0: the local ticketer's own).
    pub fn installed(&self) -> usize {
        self.keys.read().expect("keys lock").len()
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        if self.installed() == 0 {
            self.local.lifetime()
        } else {
            self.lifetime
        }
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.read().expect("keys lock");
        let Some(k) = keys.first() else {
            drop(keys);
            return self.local.encrypt(plain);
        };
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&k.name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        k.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&k.name),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() > MAX_TICKET {
            return None;
        }
        {
            let keys = self.keys.read().expect("keys lock");
            if let Some(name) = cipher.get(..NAME_LEN) {
                if let Some(k) = keys.iter().find(|k| k.name[..] == *name) {
                    let nonce: [u8; NONCE_LEN] = cipher
                        .get(NAME_LEN..NAME_LEN + NONCE_LEN)?
                        .try_into()
                        .ok()?;
                    let mut buf = cipher[NAME_LEN + NONCE_LEN..].to_vec();
                    let plain = k
                        .aead
                        .open_in_place(
                            Nonce::assume_unique_for_key(nonce),
                            Aad::from(&k.name),
                            &mut buf,
                        )
                        .ok()?
                        .len();
                    buf.truncate(plain);
                    return Some(buf);
                }
            }
        }
        // A ticket made before keys were installed (or not ours at all).
        self.local.decrypt(cipher)
    }
}

/// The process-wide ticketer (12 h ticket lifetime with installed keys).
pub fn shared() -> Arc<SharedTicketer> {
    static S: OnceLock<Arc<SharedTicketer>> = OnceLock::new();
    S.get_or_init(|| Arc::new(SharedTicketer::new(12 * 3600).expect("aws-lc-rs ticketer")))
        .clone()
}

/// Fills `b` from the system's secure random source.
pub fn random(b: &mut [u8]) -> Result<(), String> {
    aws_lc_rs::rand::fill(b).map_err(|_| "no secure random bytes".to_string())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> KeyMaterial {
        KeyMaterial {
            name: [n; NAME_LEN],
            secret: [n.wrapping_mul(7); SECRET_LEN],
        }
    }

    #[test]
    fn replicas_with_the_same_keys_open_each_others_tickets() {
        let (a, b) = (
            SharedTicketer::new(60).unwrap(),
            SharedTicketer::new(60).unwrap(),
        );
        // Before installation each has its own keys.
        let t = a.encrypt(b"state").unwrap();
        assert_eq!(a.decrypt(&t).as_deref(), Some(&b"state"[..]));
        assert_eq!(b.decrypt(&t), None);
        assert!(a.install(&[key(1)]));
        assert!(!a.install(&[key(1)]), "a repeat is no change");
        b.install(&[key(1)]);
        let t = a.encrypt(b"session").unwrap();
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"session"[..]));
        assert_eq!(a.lifetime(), 60);
        // Rotation: the previous key still opens; a dropped key no longer does.
        b.install(&[key(2), key(1)]);
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"session"[..]));
        let t2 = b.encrypt(b"x").unwrap();
        assert_eq!(&t2[..NAME_LEN], &[2; NAME_LEN]);
        b.install(&[key(3), key(2)]);
        assert_eq!(b.decrypt(&t), None);
    }

    #[test]
    fn forged_or_damaged_tickets_are_refused() {
        let a = SharedTicketer::new(60).unwrap();
        a.install(&[key(1)]);
        let t = a.encrypt(b"session").unwrap();
        for i in [0, NAME_LEN, NAME_LEN + NONCE_LEN, t.len() - 1] {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(a.decrypt(&bad), None, "byte {i}");
        }
        assert_eq!(a.decrypt(&t[..NAME_LEN + 3]), None);
        assert_eq!(a.decrypt(&[]), None);
        assert_eq!(a.decrypt(&vec![1; MAX_TICKET + 1]), None);
        let other = SharedTicketer::new(60).unwrap();
        other.install(&[KeyMaterial {
            name: [1; NAME_LEN],
            secret: [9; SECRET_LEN],
        }]);
        assert_eq!(other.decrypt(&t), None, "same name, other secret");
    }
}
