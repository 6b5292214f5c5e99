//! Password rules and hashing for the built-in identity provider (DESIGN.md §5).
//!
//! The rules follow NIST SP 800-63B rev 4: a minimum length, a generous maximum, every printable
//! Unicode character (and spaces) allowed, no composition rules ("must contain a digit"), and
//! weak or commonly used passwords refused. Strength is estimated with `zxcvbn`, which also
//! catches dictionary words, keyboard walks, dates, repeats and the account's own email.
//!
//! Hashing uses Argon2id with the OWASP parameters (19 MiB, t = 2, p = 1) and PHC string output.
//! [`hash`], [`verify`] and [`dummy_hash`] (on first use) are deliberately slow, blocking CPU
//! work: async callers must run them on `tokio::task::spawn_blocking`, never on a runtime worker.
//! [`check`] is cheap enough (well under a millisecond to a few milliseconds) to call inline, but
//! may run on the same blocking task as the hash.

use std::fmt;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;

/// Default minimum password length, in Unicode characters.
///
/// NIST SP 800-63B rev 4 asks for at least 15 characters when a password is the only
/// authentication factor and 8 when it is used together with another factor (MFA). The built-in
/// identity provider is password-only, yet we choose 12 as the default because the password is
/// not the only defence: failed logins are throttled per account and per client IP, and every new
/// password must pass a strength estimate (zxcvbn score >= 3, i.e. more than ~10^8 guesses, with
/// common passwords and the account's email refused). Twelve characters keep signup on a phone
/// keyboard bearable while online guessing stays impractical under that throttling.
///
/// Deployments that want the NIST password-only figure can raise it; the gateway makes the
/// minimum configurable, which is why [`check`] takes `min_len` as a parameter.
pub const MIN_LENGTH: usize = 12;

/// Maximum password length, in Unicode characters. NIST asks to allow at least 64; 256 leaves
/// room for long passphrases and password managers while bounding the work an attacker can make
/// the server do per attempt.
pub const MAX_LENGTH: usize = 256;

/// Lowest acceptable zxcvbn score (0..=4). 3 means "safely unguessable: moderate protection from
/// offline slow-hash scenarios" (more than 10^8 guesses).
const MIN_SCORE: u8 = 3;

/// Shortest email local part that is checked for inside passwords; shorter ones ("jo") would
/// refuse too many unrelated passwords.
const MIN_LOCAL_PART: usize = 3;

/// Argon2id memory cost in KiB (19 MiB), OWASP Password Storage Cheat Sheet.
const M_COST_KIB: u32 = 19_456;
/// Argon2id iterations.
const T_COST: u32 = 2;
/// Argon2id parallelism.
const P_COST: u32 = 1;

/// Upper bounds accepted when verifying a stored hash. They leave room to raise the parameters
/// later, but refuse a corrupted or hostile PHC string that would make one verification allocate
/// gigabytes or run for minutes.
const MAX_VERIFY_M_COST_KIB: u32 = 256 * 1024;
const MAX_VERIFY_T_COST: u32 = 16;
const MAX_VERIFY_P_COST: u32 = 16;

const PARAMS: Params = match Params::new(M_COST_KIB, T_COST, P_COST, None) {
    Ok(params) => params,
    Err(_) => panic!("invalid Argon2 parameters"),
};

/// Why a new password was refused. The `Display` text is meant to be shown to the person
/// choosing the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordProblem {
    /// Fewer than `min` Unicode characters.
    TooShort { min: usize },
    /// More than `max` Unicode characters.
    TooLong { max: usize },
    /// The strength estimate is too low; `hint` is the estimator's advice (may be empty).
    TooWeak { hint: String },
    /// The password contains the local part of the account's email address.
    ContainsEmail,
}

impl fmt::Display for PasswordProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { min } => write!(
                f,
                "Use at least {min} characters. A few unrelated words make a strong password \
                 that is easy to remember."
            ),
            Self::TooLong { max } => write!(f, "Use at most {max} characters."),
            Self::TooWeak { hint } => {
                f.write_str("This password is too common or easy to guess.")?;
                if hint.is_empty() {
                    f.write_str(" Try a longer passphrase of unrelated words.")
                } else {
                    write!(f, " {hint}")
                }
            }
            Self::ContainsEmail => f.write_str(
                "Don't use your email address in your password; it is one of the first things \
                 an attacker tries.",
            ),
        }
    }
}

impl std::error::Error for PasswordProblem {}

/// Checks a new password (signup or password change) against the rules: `min_len..=MAX_LENGTH`
/// Unicode characters, must not contain the email's local part (case-insensitive, when it has at
/// least 3 characters), and a zxcvbn score of at least 3 with the email as user input.
///
/// Any printable Unicode and spaces are allowed; there are no composition rules. The password is
/// checked exactly as typed (no trimming).
pub fn check(password: &str, email: &str, min_len: usize) -> Result<(), PasswordProblem> {
    let len = password.chars().count();
    if len < min_len {
        return Err(PasswordProblem::TooShort { min: min_len });
    }
    if len > MAX_LENGTH {
        return Err(PasswordProblem::TooLong { max: MAX_LENGTH });
    }

    let email = email.trim();
    let local = email.rsplit_once('@').map_or(email, |(local, _)| local);
    let local_lower = local.to_lowercase();
    if local_lower.chars().count() >= MIN_LOCAL_PART
        && password.to_lowercase().contains(&local_lower)
    {
        return Err(PasswordProblem::ContainsEmail);
    }

    let inputs: Vec<&str> = [email, local]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    let estimate = zxcvbn::zxcvbn(password, &inputs);
    if u8::from(estimate.score()) >= MIN_SCORE {
        return Ok(());
    }
    let hint = estimate
        .feedback()
        .map(|feedback| {
            feedback
                .warning()
                .map(|w| w.to_string())
                .into_iter()
                .chain(feedback.suggestions().iter().map(|s| s.to_string()))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Err(PasswordProblem::TooWeak { hint })
}

fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, PARAMS)
}

/// Hashes a password with Argon2id (m = 19456 KiB, t = 2, p = 1) and a fresh random 128-bit salt
/// from rand's OS-seeded CSPRNG, returning the PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`).
///
/// Blocking CPU work (tens of milliseconds, 19 MiB of memory): run it on
/// `tokio::task::spawn_blocking`.
///
/// # Panics
///
/// Only if Argon2 rejects its input, which cannot happen for passwords shorter than 4 GiB.
pub fn hash(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16-byte salt is a valid PHC salt");
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .expect("Argon2id hashing with valid parameters cannot fail")
        .to_string()
}

/// Checks `password` against a PHC string produced by [`hash`] (the parameters are read from
/// the string, so hashes made with older parameters keep verifying). Returns `false` for a wrong
/// password and for a malformed, non-Argon2 or absurdly expensive PHC string; never panics.
/// The hash comparison is constant-time.
///
/// Blocking CPU work: run it on `tokio::task::spawn_blocking`.
pub fn verify(password: &str, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    if Algorithm::try_from(parsed.algorithm).is_err() {
        return false;
    }
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if params.m_cost() > MAX_VERIFY_M_COST_KIB
        || params.t_cost() > MAX_VERIFY_T_COST
        || params.p_cost() > MAX_VERIFY_P_COST
    {
        return false;
    }
    argon2()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// The form a password is checked and hashed in: NFKC, as NIST SP 800-63B rev 4 (3.1.1.2) asks
/// of verifiers that accept Unicode. The same password typed on another keyboard (a precomposed
/// or a combining accent, full-width digits from an East Asian input method, a no-break space)
/// is then the same password. ASCII comes back borrowed, unchanged.
pub fn normalize(password: &str) -> std::borrow::Cow<'_, str> {
    icu_normalizer::ComposingNormalizerBorrowed::new_nfkc().normalize(password)
}

/// What [`verify_typed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified {
    /// The normalized password matches.
    Yes,
    /// Only the password exactly as typed matches: a hash made before passwords were normalized
    /// (2026-11-30). The caller replaces it with [`hash`] of the normalized password.
    AsTyped,
    No,
}

/// Checks a typed password against a PHC string: its normalized form, then, when normalizing
/// changed it, the password as typed (accounts hashed before normalization). A wrong password
/// costs the same one or two hashes whether or not the account exists (the dummy hash gets the
/// same treatment). Blocking CPU work.
pub fn verify_typed(typed: &str, phc: &str) -> Verified {
    let normalized = normalize(typed);
    if verify(&normalized, phc) {
        Verified::Yes
    } else if normalized != typed && verify(typed, phc) {
        Verified::AsTyped
    } else {
        Verified::No
    }
}

/// A valid Argon2id PHC hash of a random password, computed once per process. When a login names
/// an email that has no account, verify the submitted password against this so the answer takes
/// as long as for a real account and does not reveal whether the email exists.
///
/// The first call does the hashing work: call it from `spawn_blocking` (or once at startup).
pub fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        hash(&secret)
    })
}

/// Runs Argon2 work on its own blocking pool, at most one job per CPU at a time: each job holds
/// 19 MiB, so unbounded concurrency under a signup or login burst would grow memory without
/// making anything faster. `None` if the job panicked.
pub async fn run_blocking<T, F>(job: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    static SLOTS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    let slots = SLOTS.get_or_init(|| tokio::sync::Semaphore::new(cpus()));
    let _permit = slots.acquire().await.ok()?;
    hashing_pool().spawn_blocking(job).await.ok()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Argon2 gets its own threads so a burst of logins never occupies the proxy's workers (nor
/// tokio's blocking pool, which configuration reloads use). Each hash's 19 MiB comes from
/// jemalloc's normal arenas (`oversize_threshold:0` in .cargo/config.toml): reused while logins
/// keep coming, handed back by jemalloc's background thread 1 s after the burst. Measured in the
/// benchmark (Redis gateway, 10,000 signups and 200 logins): 61 MiB right after, 21 MiB 3 s
/// later. With eager purging of large blocks (jemalloc's default) logins ran at 55-58/s instead
/// of 77-84/s.
fn hashing_pool() -> &'static tokio::runtime::Runtime {
    static POOL: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    POOL.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .thread_name("gatehouse-argon2")
            .max_blocking_threads(cpus())
            .build()
            .expect("building the Argon2 thread pool")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMAIL: &str = "alice.smith@example.com";

    /// Deterministic pseudo-random printable ASCII of `len` characters (no dictionary structure).
    fn random_ascii(len: usize, seed: u64) -> String {
        let alphabet: Vec<char> =
            "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789-_.!#%+=~"
                .chars()
                .collect();
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                alphabet[((state >> 33) as usize) % alphabet.len()]
            })
            .collect()
    }

    #[test]
    fn common_passwords_are_refused() {
        for weak in [
            "password1234",
            "correcthorse",
            "qwertyuiop123",
            "123456789012",
            "aaaaaaaaaaaaaaaa",
            "iloveyou12345",
        ] {
            match check(weak, EMAIL, MIN_LENGTH) {
                Err(PasswordProblem::TooWeak { .. }) => {}
                other => panic!("{weak:?} should be too weak, got {other:?}"),
            }
        }
    }

    #[test]
    fn weak_password_gets_a_hint() {
        let Err(PasswordProblem::TooWeak { hint }) = check("password1234", EMAIL, MIN_LENGTH)
        else {
            panic!("expected TooWeak");
        };
        assert!(!hint.is_empty());
    }

    #[test]
    fn long_random_passphrase_is_accepted() {
        assert_eq!(
            check("tangerine glacier voltmeter oboe", EMAIL, MIN_LENGTH),
            Ok(())
        );
        assert_eq!(check(&random_ascii(16, 7), EMAIL, MIN_LENGTH), Ok(()));
    }

    #[test]
    fn no_composition_rules() {
        assert_eq!(
            check("purple monkey dishwasher sunrise", EMAIL, MIN_LENGTH),
            Ok(())
        );
        // All lowercase letters, no digits or symbols, and non-ASCII characters are fine too.
        assert_eq!(
            check("grüne schildkröte tanzt überall", EMAIL, MIN_LENGTH),
            Ok(())
        );
    }

    #[test]
    fn max_lengths() {
        let p64 = random_ascii(64, 1);
        let p256 = random_ascii(256, 2);
        let p257 = random_ascii(257, 3);
        assert_eq!(p64.chars().count(), 64);
        assert_eq!(check(&p64, EMAIL, MIN_LENGTH), Ok(()));
        assert_eq!(check(&p256, EMAIL, MIN_LENGTH), Ok(()));
        assert_eq!(
            check(&p257, EMAIL, MIN_LENGTH),
            Err(PasswordProblem::TooLong { max: MAX_LENGTH })
        );
        // A long passphrase with spaces is accepted at exactly the maximum.
        let words = "tangerine glacier voltmeter oboe ";
        let p: String = words.chars().cycle().take(MAX_LENGTH).collect();
        assert_eq!(check(&p, EMAIL, MIN_LENGTH), Ok(()));
    }

    #[test]
    fn min_length_counts_unicode_characters() {
        assert_eq!(
            check(&random_ascii(11, 4), EMAIL, MIN_LENGTH),
            Err(PasswordProblem::TooShort { min: 12 })
        );
        // 11 characters but 22 bytes: still too short.
        let accented = "éàüößçñøåîœ";
        assert_eq!(accented.chars().count(), 11);
        assert_eq!(
            check(accented, EMAIL, MIN_LENGTH),
            Err(PasswordProblem::TooShort { min: 12 })
        );
        // The minimum is a parameter.
        let fifteen = random_ascii(15, 5);
        assert_eq!(check(&fifteen, EMAIL, MIN_LENGTH), Ok(()));
        assert_eq!(
            check(&fifteen, EMAIL, 16),
            Err(PasswordProblem::TooShort { min: 16 })
        );
    }

    #[test]
    fn email_local_part_is_refused() {
        assert_eq!(
            check("tangerine ALICE.Smith voltmeter", EMAIL, MIN_LENGTH),
            Err(PasswordProblem::ContainsEmail)
        );
        assert_eq!(
            check("xx alice.smith@example.com xx", EMAIL, MIN_LENGTH),
            Err(PasswordProblem::ContainsEmail)
        );
        // Local parts shorter than 3 characters are not checked.
        assert_eq!(
            check(
                "enjoy purple monkey dishwasher",
                "jo@example.com",
                MIN_LENGTH
            ),
            Ok(())
        );
    }

    #[test]
    fn messages_are_readable() {
        assert!(
            PasswordProblem::TooShort { min: 12 }
                .to_string()
                .starts_with("Use at least 12 characters")
        );
        assert!(
            PasswordProblem::TooWeak {
                hint: String::new()
            }
            .to_string()
            .starts_with("This password is too common or easy to guess.")
        );
        assert_eq!(
            PasswordProblem::TooLong { max: 256 }.to_string(),
            "Use at most 256 characters."
        );
    }

    #[test]
    fn hash_round_trip() {
        let phc = hash("tangerine glacier voltmeter oboe");
        assert!(verify("tangerine glacier voltmeter oboe", &phc));
        assert!(!verify("tangerine glacier voltmeter obo", &phc));
        assert!(!verify("", &phc));
        // A fresh salt every time.
        assert_ne!(phc, hash("tangerine glacier voltmeter oboe"));
    }

    /// One password, however the keyboard spelled it; and hashes made before normalization
    /// still verify the password as it was typed then.
    #[test]
    fn passwords_are_normalized_and_old_hashes_still_verify() {
        let composed = "cr\u{00E8}me br\u{00FB}l\u{00E9}e 2024 tangerine";
        let combining = "cre\u{0300}me bru\u{0302}le\u{0301}e 2024 tangerine";
        let wide = "cr\u{00E8}me\u{3000}br\u{00FB}l\u{00E9}e\u{00A0}\u{FF12}\u{FF10}\u{FF12}\u{FF14} tangerine";
        for typed in [combining, wide] {
            assert_eq!(normalize(typed), composed, "{typed:?}");
        }
        assert!(matches!(
            normalize("plain ascii passphrase"),
            std::borrow::Cow::Borrowed(_)
        ));

        let phc = hash(&normalize(combining));
        for typed in [composed, combining, wide] {
            assert_eq!(verify_typed(typed, &phc), Verified::Yes, "{typed:?}");
        }
        assert_eq!(
            verify_typed("creme brulee 2024 tangerine", &phc),
            Verified::No
        );

        // Hashed as typed, before normalization: that spelling verifies (to be rehashed), a
        // wrong password does not.
        let old = hash(combining);
        assert_eq!(verify_typed(combining, &old), Verified::AsTyped);
        assert_eq!(verify_typed(composed, &old), Verified::No);
        assert_eq!(verify_typed("cre\u{0300}me", &old), Verified::No);
    }

    #[test]
    fn phc_carries_owasp_parameters() {
        let phc = hash("tangerine glacier voltmeter oboe");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(dummy_hash().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(std::ptr::eq(dummy_hash(), dummy_hash()));
        assert!(!verify("tangerine glacier voltmeter oboe", dummy_hash()));
    }

    #[test]
    fn malformed_phc_is_false() {
        for bad in [
            "",
            "not a hash",
            "$argon2id$",
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$!!!!",
            "$bcrypt$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            // Absurd cost parameters are refused rather than computed.
            "$argon2id$v=19$m=4294967295,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
            "$argon2id$v=19$m=19456,t=4294967295,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        ] {
            assert!(!verify("password", bad), "{bad:?}");
        }
    }
}
