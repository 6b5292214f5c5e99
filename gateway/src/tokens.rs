//! Opaque tokens: 256 bits from the OS RNG, base64url without padding. The store only ever sees
//! their SHA-256, so a leaked database holds nothing a client could present.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
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

/// Bytes of a grant family's id. Every refresh token of one family carries it, so a rotated
/// token that comes back names its family without a record per rotation.
pub const FAMILY_LEN: usize = 16;
pub type FamilyId = [u8; FAMILY_LEN];

/// The key that signs the family id in refresh tokens (HMAC-SHA256): one per store, so every
/// replica checks what the others issued.
pub type RefreshKey = [u8; 32];

/// A fresh family id (128 random bits; only the family's refresh tokens carry it).
pub fn new_family() -> FamilyId {
    let mut id = [0u8; FAMILY_LEN];
    rand::rng().fill_bytes(&mut id);
    id
}

pub fn new_refresh_key() -> RefreshKey {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 16;
const REFRESH_LEN: usize = FAMILY_LEN + NONCE_LEN + TAG_LEN;

/// The length of a refresh token (`generate_refresh`).
pub const REFRESH_TOKEN_CHARS: usize = (REFRESH_LEN * 8).div_ceil(6);

fn refresh_mac(key: &RefreshKey, signed: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(signed);
    mac
}

/// A refresh token of `family`: the family id, 256 random bits, and the first 128 bits of
/// their HMAC under `key`, base64url (86 characters). Without the tag, anyone who saw the
/// beginning of one of the family's tokens (a log that cuts tokens short, a long-expired one)
/// could make up a "rotated" token and have the family revoked.
pub fn generate_refresh(key: &RefreshKey, family: &FamilyId) -> String {
    let mut bytes = [0u8; REFRESH_LEN];
    bytes[..FAMILY_LEN].copy_from_slice(family);
    rand::rng().fill_bytes(&mut bytes[FAMILY_LEN..FAMILY_LEN + NONCE_LEN]);
    let (signed, tag) = bytes.split_at_mut(FAMILY_LEN + NONCE_LEN);
    tag.copy_from_slice(&refresh_mac(key, signed).finalize().into_bytes()[..TAG_LEN]);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The family a refresh token names, when `key` signed it; None for any other token, such as
/// the 43-character refresh tokens issued before families. Says nothing about whether the
/// token is live. The tag is compared in constant time.
pub fn refresh_family(key: &RefreshKey, token: &str) -> Option<FamilyId> {
    let mut bytes = [0u8; REFRESH_LEN];
    match URL_SAFE_NO_PAD.decode_slice(token.as_bytes(), &mut bytes) {
        Ok(REFRESH_LEN) => {}
        _ => return None,
    }
    let (signed, tag) = bytes.split_at(FAMILY_LEN + NONCE_LEN);
    refresh_mac(key, signed).verify_truncated_left(tag).ok()?;
    signed[..FAMILY_LEN].try_into().ok()
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

/// Shape check before touching the store: an access token (or session id) we issued is exactly
/// 43 base64url chars. (Refresh tokens are longer: `generate_refresh`.)
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
    fn refresh_tokens_name_their_family_under_their_key_only() {
        let (key, family) = (new_refresh_key(), new_family());
        let (a, b) = (
            generate_refresh(&key, &family),
            generate_refresh(&key, &family),
        );
        assert_eq!(a.len(), 86);
        assert_eq!(REFRESH_TOKEN_CHARS, 86);
        assert_ne!(a, b, "256 random bits after the family id");
        assert_eq!(refresh_family(&key, &a), Some(family));
        assert_eq!(refresh_family(&key, &b), Some(family));
        let other = generate_refresh(&key, &new_family());
        assert_ne!(refresh_family(&key, &other), Some(family));
        // Another key (another store), a changed character anywhere, a made-up token with the
        // family's id: nothing.
        assert_eq!(refresh_family(&new_refresh_key(), &a), None);
        for i in [0, 21, 22, 63, 64, 85] {
            let mut bytes = a.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes).unwrap();
            assert_eq!(refresh_family(&key, &changed), None, "character {i}");
        }
        let forged = format!("{}{}", &a[..22], "A".repeat(64));
        assert_eq!(refresh_family(&key, &forged), None);
        // Access tokens, refresh tokens from before families, and anything else: no family.
        assert_eq!(refresh_family(&key, &generate()), None);
        assert_eq!(refresh_family(&key, &format!("{a}A")), None);
        assert_eq!(refresh_family(&key, &a[..85]), None);
        assert_eq!(refresh_family(&key, &"é".repeat(43)), None);
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
