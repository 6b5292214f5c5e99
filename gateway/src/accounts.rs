//! Users of the built-in identity provider: a stable UUID, a unique case-insensitive email and
//! an Argon2id password hash.

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreResult, kv, unix_now};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Never changes; sent upstream as X-Authenticated-UserId.
    pub id: String,
    /// Normalized (trimmed, lowercase).
    pub email: String,
    pub password_hash: String,
    pub created_at: u64,
}

/// The longest address SMTP allows (RFC 5321 4.5.3.1 path limits).
pub const MAX_EMAIL_LEN: usize = 254;

/// Trims and lowercases an email; `None` when it is not plausibly an address. Deliverability is
/// not checked here (there is no email verification in the built-in IdP).
pub fn normalize_email(raw: &str) -> Option<String> {
    let e = raw.trim().to_lowercase();
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

fn email_key(email: &str) -> String {
    format!("user:email:{email}")
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
        ] {
            assert_eq!(normalize_email(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn unique_case_insensitive_emails() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let a = create(&s, "alice@example.com", "h".into())
            .await
            .unwrap()
            .unwrap();
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
