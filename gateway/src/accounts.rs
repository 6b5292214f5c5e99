//! Users of the built-in identity provider: a stable UUID, a unique case-insensitive email and
//! an Argon2id password hash.

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, StoreResult, kv, unix_now};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Never changes; sent upstream as X-Authenticated-UserId.
    pub id: String,
    /// Normalized as when the account was made (`normalize_email`; trimmed and lowercase only
    /// for accounts made before 2026-11-30).
    pub email: String,
    pub password_hash: String,
    pub created_at: u64,
}

/// The longest address SMTP allows (RFC 5321 4.5.3.1 path limits).
pub const MAX_EMAIL_LEN: usize = 254;

/// The one form of an email an account is kept under: trimmed, NFKC, lowercase, NFC (PRECIS
/// UsernameCaseMapped, RFC 8265 3.4, with NFKC for its width mapping). So the same address typed
/// on another keyboard (precomposed or combining accents, full-width letters from an East Asian
/// input method, a ligature) finds the same account instead of making a second one that looks
/// identical on every page. `None` when it is not plausibly an address. Deliverability is not
/// checked here (there is no email verification in the built-in IdP).
pub fn normalize_email(raw: &str) -> Option<String> {
    let nfkc = icu_normalizer::ComposingNormalizerBorrowed::new_nfkc();
    let nfc = icu_normalizer::ComposingNormalizerBorrowed::new_nfc();
    let lower = nfkc.normalize(raw.trim()).to_lowercase();
    plausible_email(nfc.normalize(&lower).into_owned())
}

/// The form accounts made before 2026-11-30 are kept under (trimmed and lowercase, nothing
/// else), when it differs from `normalize_email`'s: only non-ASCII input can differ.
pub fn legacy_email(raw: &str, normalized: &str) -> Option<String> {
    plausible_email(raw.trim().to_lowercase()).filter(|legacy| legacy != normalized)
}

/// An address as typed in a form: the form it is counted and created under, and the form an
/// account made before normalization would be kept under, when that differs.
#[derive(Debug, PartialEq, Eq)]
pub struct EmailForms {
    pub email: String,
    pub legacy: Option<String>,
}

/// The forms a sign-in looks an address up by: normalized and (when it differs) the legacy
/// form; or, for an address that is one only in its legacy form (a full-width at sign in the
/// local part, which NFKC turns into a second `@`), that form alone, so such an account made
/// before normalization can still sign in. Signups take only `normalize_email`'s addresses.
pub fn login_forms(raw: &str) -> Option<EmailForms> {
    signup_forms(raw).or_else(|| {
        plausible_email(raw.trim().to_lowercase()).map(|legacy| EmailForms {
            email: legacy.clone(),
            legacy: Some(legacy),
        })
    })
}

/// The forms of an address typed at signup: normalized, and the legacy form when it differs
/// (an account made under it takes the address too).
pub fn signup_forms(raw: &str) -> Option<EmailForms> {
    let email = normalize_email(raw)?;
    let legacy = legacy_email(raw, &email);
    Some(EmailForms { email, legacy })
}

fn plausible_email(e: String) -> Option<String> {
    let (local, domain) = e.split_once('@')?;
    let plausible = !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && e.len() <= MAX_EMAIL_LEN
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    plausible.then_some(e)
}

const EMAIL_KEYS: &str = "user:email:";

fn email_key(email: &str) -> String {
    format!("{EMAIL_KEYS}{email}")
}

/// Records each account made before emails were normalized under its normalized email too,
/// when no account holds that yet: every spelling of its address then finds it, and no signup
/// can make a second account that looks the same on every page (whose sign-ins would share the
/// address's throttle and remembered browsers). Of old accounts whose addresses normalize alike
/// the oldest gets it; the others keep their own spelling. Run at each start-up, in the
/// background: it reads the key space once; what it records is idempotent, and replicas
/// running it together record each address once. Returns (accounts looked at, addresses
/// recorded).
pub async fn index_normalized_emails(store: &dyn Store) -> StoreResult<(usize, usize)> {
    // Only a non-ASCII address can differ from its normalized form (the keys are lowercase).
    let keys = store.kv_keys(EMAIL_KEYS, |key| !key.is_ascii()).await?;
    // (normalized, created_at, spelling, id), oldest first per address.
    let mut old = Vec::new();
    for key in &keys {
        let Some(email) = key.strip_prefix(EMAIL_KEYS) else {
            continue;
        };
        let Some(normalized) = normalize_email(email) else {
            // Valid once, not after NFKC (a full-width at sign in the local part): such an
            // account signs in with its own spelling only (`login_forms`).
            tracing::info!(
                "an account from before email normalization has an address that is not one once normalized; it signs in with its own spelling only"
            );
            continue;
        };
        if normalized == email {
            continue;
        }
        // One unreadable record is logged and skipped, never the whole sweep.
        let user = match kv::get::<String>(store, key).await {
            Ok(Some(id)) => get(store, &id).await,
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match user {
            Ok(Some(user)) => old.push((normalized, user.created_at, email.to_string(), user.id)),
            Ok(None) => {}
            Err(StoreError::Corrupt(e)) => {
                tracing::warn!(error = %e, "an account record cannot be read; left out of the email index");
            }
            Err(e) => return Err(e),
        }
    }
    old.sort();
    let mut recorded = 0;
    for (normalized, _, _, id) in &old {
        if kv::put_new(store, &email_key(normalized), id, 0).await? {
            recorded += 1;
        } else if let Some(holder) = kv::get::<String>(store, &email_key(normalized)).await?
            && &holder != id
        {
            // Two accounts that look alike, made before the sweep could prevent it: say so
            // (by id; the address stays out of logs) for an administrator to resolve.
            tracing::warn!(account = %id, address_held_by = %holder, "an account from before email normalization shares its normalized address with another account; it signs in only with its own spelling");
        }
    }
    Ok((keys.len(), recorded))
}

fn id_key(id: &str) -> String {
    format!("user:id:{id}")
}

pub async fn get(store: &dyn Store, id: &str) -> StoreResult<Option<User>> {
    kv::get(store, &id_key(id)).await
}

pub async fn find_by_email(store: &dyn Store, email: &str) -> StoreResult<Option<User>> {
    match kv::get::<String>(store, &email_key(email)).await? {
        Some(id) => get(store, &id).await,
        None => Ok(None),
    }
}

/// The account an email typed at sign-in or signup names: the one kept under its `legacy` form
/// (exactly how an account made before normalization was written) first, else the one kept
/// under its normalized form.
pub async fn find(
    store: &dyn Store,
    email: &str,
    legacy: Option<&str>,
) -> StoreResult<Option<User>> {
    if let Some(legacy) = legacy
        && let Some(user) = find_by_email(store, legacy).await?
    {
        return Ok(Some(user));
    }
    find_by_email(store, email).await
}

/// Replaces an account's password hash (a hash of the normalized password for one made before
/// passwords were normalized).
pub async fn set_password_hash(
    store: &dyn Store,
    user: &User,
    password_hash: String,
) -> StoreResult<()> {
    let updated = User {
        password_hash,
        ..user.clone()
    };
    kv::put(store, &id_key(&user.id), &updated, 0).await
}

/// Creates a user; `None` when the email is taken (the email key is claimed atomically, so two
/// concurrent signups cannot both win). The user record is written before the email is claimed,
/// and kept when the claim fails (a timed-out claim may still have happened): a failure leaves
/// at worst an unreachable record, never an email claimed by nobody (which would lock that
/// address out of signup and login for good).
pub async fn create(
    store: &dyn Store,
    email: &str,
    password_hash: String,
) -> StoreResult<Option<User>> {
    let user = User {
        id: uuid::Uuid::new_v4().to_string(),
        email: email.to_string(),
        password_hash,
        created_at: unix_now(),
    };
    kv::put(store, &id_key(&user.id), &user, 0).await?;
    match kv::put_new(store, &email_key(email), &user.id, 0).await? {
        true => Ok(Some(user)),
        false => {
            let _ = store.kv_delete(&id_key(&user.id)).await;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new account with a placeholder hash.
    async fn made(s: &dyn Store, email: &str) -> User {
        create(s, email, "h".into()).await.unwrap().unwrap()
    }

    #[test]
    fn emails_normalize() {
        assert_eq!(
            normalize_email("  Alice@Example.COM "),
            Some("alice@example.com".into())
        );
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "a@b",
            "a b@example.com",
            "a@@b.com",
            "a@.com",
            // A full-width at sign is an at sign; two are still too many.
            "a\u{FF20}b@example.com",
        ] {
            assert_eq!(normalize_email(bad), None, "{bad}");
        }
    }

    /// Every spelling of one address is one account: composed and combining accents, full-width
    /// letters, ligatures, a capital sharp s. ASCII input is unchanged, so it never has a legacy
    /// form.
    #[test]
    fn emails_normalize_unicode_to_one_form() {
        let one = normalize_email("j\u{00E9}r\u{00F4}me@example.com").unwrap();
        for spelling in [
            "je\u{0301}ro\u{0302}me@example.com",
            "J\u{00C9}R\u{00D4}ME@EXAMPLE.COM",
            "JE\u{0301}RO\u{0302}ME@example.com",
            "\u{FF4A}\u{00E9}r\u{00F4}\u{FF4D}\u{FF45}\u{FF20}example.com",
        ] {
            assert_eq!(
                normalize_email(spelling).as_deref(),
                Some(one.as_str()),
                "{spelling:?}"
            );
        }
        assert_eq!(
            normalize_email("\u{FB01}ona@example.com").as_deref(),
            Some("fiona@example.com")
        );
        assert_eq!(
            normalize_email("STRA\u{1E9E}E@example.com").as_deref(),
            Some("stra\u{00DF}e@example.com")
        );
        // Legacy forms: only for input that normalization changes.
        assert_eq!(
            legacy_email(" Alice@Example.COM", "alice@example.com"),
            None
        );
        let typed = "Je\u{0301}ro\u{0302}me@example.com";
        assert_eq!(
            legacy_email(typed, &one).as_deref(),
            Some("je\u{0301}ro\u{0302}me@example.com")
        );
        assert_eq!(legacy_email("j\u{00E9}r\u{00F4}me@example.com", &one), None);
        // An address only before normalization: found by its own spelling at sign-in.
        let wide_at = "a\u{FF20}b@example.com";
        assert_eq!(normalize_email(wide_at), None);
        assert_eq!(
            login_forms(wide_at),
            Some(EmailForms {
                email: wide_at.to_string(),
                legacy: Some(wide_at.to_string())
            })
        );
        assert_eq!(signup_forms(wide_at), None);
        assert_eq!(
            login_forms(" Bo@Example.com"),
            Some(EmailForms {
                email: "bo@example.com".to_string(),
                legacy: None
            })
        );
        assert_eq!(login_forms("not an address"), None);
    }

    /// An account made before normalization (kept under the email as typed, lowercased) is found
    /// by that spelling, then by every spelling once the start-up sweep has recorded it under the
    /// normalized form; its hash can be replaced, its id stays.
    #[tokio::test]
    async fn accounts_from_before_normalization_are_found_and_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let typed = "je\u{0301}ro\u{0302}me@example.com";
        let old = made(&s, typed).await;
        let normalized = normalize_email(typed).unwrap();
        let legacy = legacy_email(typed, &normalized);
        assert_eq!(legacy.as_deref(), Some(typed));
        let found = find(&s, &normalized, legacy.as_deref()).await.unwrap();
        assert_eq!(found.as_ref(), Some(&old));
        // Another spelling has no legacy form that names it, until the sweep.
        let other = "J\u{00C9}R\u{00D4}ME@example.com";
        let other_legacy = legacy_email(other, &normalized);
        assert_eq!(
            find(&s, &normalized, other_legacy.as_deref())
                .await
                .unwrap(),
            None
        );
        index_normalized_emails(&s).await.unwrap();
        assert_eq!(
            find(&s, &normalized, other_legacy.as_deref())
                .await
                .unwrap(),
            Some(old.clone())
        );
        // The new hash replaces the old one; the id stays.
        set_password_hash(&s, &old, "h2".into()).await.unwrap();
        let updated = get(&s, &old.id).await.unwrap().unwrap();
        assert_eq!(
            (updated.id, updated.password_hash),
            (old.id, "h2".to_string())
        );
    }

    /// The start-up sweep records accounts from before normalization under their normalized
    /// email: found by every spelling, and a signup in another spelling is refused. Of two old
    /// accounts that normalize alike, the address goes to the oldest; running
    /// it again records nothing more.
    #[tokio::test]
    async fn old_accounts_are_indexed_by_their_normalized_email() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let nfd = made(&s, "je\u{0301}ro\u{0302}me@example.com").await;
        let wide = made(&s, "\u{FF41}nna@example.com").await;
        made(&s, "plain@example.com").await;
        // A younger old account whose address normalizes like the first.
        let younger = made(&s, "j\u{00E9}ro\u{0302}me@example.com").await;
        let younger = User {
            created_at: nfd.created_at + 1,
            ..younger
        };
        kv::put(&s, &id_key(&younger.id), &younger, 0)
            .await
            .unwrap();
        s.kv_put("user:emailish", b"not an account", 0)
            .await
            .unwrap();

        // ASCII addresses are not even read.
        assert_eq!(index_normalized_emails(&s).await.unwrap(), (3, 2));
        let jerome = normalize_email("J\u{00C9}R\u{00D4}ME@example.com").unwrap();
        let found = find(&s, &jerome, None).await.unwrap().unwrap();
        assert_eq!(found.id, nfd.id);
        let anna = find(&s, "anna@example.com", None).await.unwrap().unwrap();
        assert_eq!(anna.id, wide.id);
        assert!(
            create(&s, "anna@example.com", "h".into())
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(index_normalized_emails(&s).await.unwrap(), (4, 0));
    }

    #[tokio::test]
    async fn unique_case_insensitive_emails() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let a = made(&s, "alice@example.com").await;
        assert!(
            create(&s, "alice@example.com", "h2".into())
                .await
                .unwrap()
                .is_none()
        );
        let found = find_by_email(&s, &normalize_email("ALICE@example.com").unwrap())
            .await
            .unwrap();
        assert_eq!(found, Some(a.clone()));
        assert_eq!(get(&s, &a.id).await.unwrap(), Some(a));

        // Concurrent signups for one address: one account, and it is the one the email finds.
        let s = std::sync::Arc::new(s);
        let tries: Vec<_> = (0..10)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { create(&*s, "bo@example.com", format!("h{i}")).await })
            })
            .collect();
        let mut won = Vec::new();
        for t in tries {
            won.extend(t.await.unwrap().unwrap());
        }
        assert_eq!(won.len(), 1);
        let found = find_by_email(&*s, "bo@example.com").await.unwrap();
        assert_eq!(found.as_ref(), Some(&won[0]));
    }
}
