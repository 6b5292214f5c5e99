//! Opaque tokens: 256 bits from the OS RNG, base64url without padding. The store only ever sees
//! their SHA-256, so a leaked database holds nothing a client could present.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// SHA-256 of a token; the key under which the store keeps it.
pub type TokenHash = [u8; 32];

/// A fresh random token (43 base64url characters).
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    // ThreadRng is a CSPRNG (ChaCha12) seeded and periodically reseeded from the OS.
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Bytes of a grant family's id. Every refresh token of one family starts with it, so a
/// rotated token that comes back names its family without a record per rotation.
pub const FAMILY_LEN: usize = 16;
pub type FamilyId = [u8; FAMILY_LEN];

/// A fresh family id (128 random bits; only the family's refresh tokens carry it).
pub fn new_family() -> FamilyId {
    let mut id = [0u8; FAMILY_LEN];
    rand::rng().fill_bytes(&mut id);
    id
}

/// A refresh token of `family`: its id, then 256 random bits, base64url (64 characters).
pub fn generate_refresh(family: &FamilyId) -> String {
    let mut bytes = [0u8; REFRESH_LEN];
    bytes[..FAMILY_LEN].copy_from_slice(family);
    rand::rng().fill_bytes(&mut bytes[FAMILY_LEN..]);
    URL_SAFE_NO_PAD.encode(bytes)
}

const REFRESH_LEN: usize = FAMILY_LEN + 32;

/// The family a refresh token names; None for any other shape, such as the 43-character
/// refresh tokens issued before families. Says nothing about whether the token is genuine.
pub fn refresh_family(token: &str) -> Option<FamilyId> {
    let mut bytes = [0u8; REFRESH_LEN];
    match URL_SAFE_NO_PAD.decode_slice(token.as_bytes(), &mut bytes) {
        Ok(REFRESH_LEN) => bytes[..FAMILY_LEN].try_into().ok(),
        _ => None,
    }
}

pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

pub fn hash_hex(value: &[u8]) -> String {
    hex::encode(Sha256::digest(value))
}

/// Compares two byte strings without leaking where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Checks a presented client secret against the SHA-256 (hex) in the config, in constant time.
pub fn secret_matches(presented: &str, expected_sha256_hex: &str) -> bool {
    let presented = hash_hex(presented.as_bytes());
    constant_time_eq(presented.as_bytes(), expected_sha256_hex.as_bytes())
}

/// Shape check before touching the store: a token we issued is exactly 43 base64url chars.
pub fn looks_like_token(token: &str) -> bool {
    token.len() == 43 && token.bytes().all(|b| BASE64URL[usize::from(b)])
}

/// The base64url alphabet as a table: one load per byte on every proxied request, where the
/// range comparisons took about four times the instructions.
static BASE64URL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_256_bit_base64url_and_unique() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 43);
        assert!(looks_like_token(&a));
        assert_ne!(a, b);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
    }

    #[test]
    fn refresh_tokens_name_their_family_and_nothing_else_does() {
        let family = new_family();
        let (a, b) = (generate_refresh(&family), generate_refresh(&family));
        assert_eq!(a.len(), 64);
        assert_ne!(a, b, "256 random bits after the family id");
        assert_eq!(refresh_family(&a), Some(family));
        assert_eq!(refresh_family(&b), Some(family));
        assert_ne!(
            refresh_family(&generate_refresh(&new_family())),
            Some(family)
        );
        // Access tokens, refresh tokens from before families, and anything else: no family.
        assert_eq!(refresh_family(&generate()), None);
        assert_eq!(refresh_family(&format!("{a}A")), None);
        assert_eq!(refresh_family(&a[..63]), None);
        assert_eq!(refresh_family(&format!("{}+", &a[..63])), None);
        assert_eq!(refresh_family(&"é".repeat(32)), None);
    }

    #[test]
    fn hash_is_sha256() {
        // SHA-256("abc") from FIPS 180-2.
        assert_eq!(
            hex::encode(hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn secret_compare() {
        let expected = hash_hex(b"s3cret-s3cret-s3cret");
        assert!(secret_matches("s3cret-s3cret-s3cret", &expected));
        assert!(!secret_matches("s3cret-s3cret-s3creT", &expected));
        assert!(!secret_matches("", &expected));
    }

    #[test]
    fn shape_check_rejects_garbage() {
        assert!(!looks_like_token("short"));
        assert!(!looks_like_token(&"a".repeat(44)));
        assert!(!looks_like_token(&format!("{}+", "a".repeat(42))));
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for c in (0u8..128).map(char::from) {
            let token = format!("{}{c}{}", "a".repeat(21), "a".repeat(21));
            assert_eq!(looks_like_token(&token), alphabet.contains(c), "{c:?}");
        }
        assert!(!looks_like_token(&format!("{}é", "a".repeat(41))));
    }
}
