//! The refresh_token grant (RFC 6749 section 6). Every use rotates: the presented token is
//! spent and a new pair issued into the same grant family. A rotated token that comes back
//! means two parties hold the family, and all of it is revoked (design section 5).
//!
//! Refresh tokens carry their family's id, signed with the store's key
//! (`tokens::generate_refresh`), so one record per family (`FamilyRecord`, rewritten at each
//! rotation) recognizes every rotated token of it. Refresh tokens from before families (43
//! characters) each left a marker at their rotation for the rest of their life instead (up to
//! 30 days, one per refresh); those still count.
//!
//! A rotation of a live token whose answer the gateway knows nobody will read (the client went
//! away first) is undone: the new pair is removed and the presented token put back, so the client's retry is a
//! plain refresh. A spend that failed leaves the presented token live (nothing to undo), or, when
//! the token is gone anyway (a timeout after the store ran it, or a concurrent use), nothing is
//! put back: whose spend it was is unknown.
//!
//! An answer lost after it left the gateway (a mobile connection dropping) is invisible here.
//! `--refresh-retry-seconds` (0, off, by default) lets the token rotated last be redeemed again
//! for that long after its rotation: the pair issued for it, which the client never got, is
//! revoked and a new one answers (Okta's grace period, Ory Hydra's `rotation_grace_period`).
//! Anyone else presenting it in that window holds the family until the rightful client's next
//! refresh, which then reads as reuse and ends the family.

use std::sync::Arc;

use gatehouse_crds::GrantType;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::form::Form;
use super::token::{
    Family, Presented, TokenResponse, about_to_expire, answer_once, check_scopes, discard,
    grant_revoked, invalid_grant, marker_value, require_grant, revoke_family, revoke_marked_grant,
    rotated_key, still_offered, token_pair, unavailable,
};
use crate::error::{GatewayError, OAuthErrorCode, oauth};
use crate::snapshot::{ClientRuntime, Snapshot};
use crate::state::AppState;
use crate::store::{StoreError, TokenKind, TokenRecord, kv, unix_now};
use crate::tokens::{self, FamilyId, RefreshKey, TokenHash};

/// Default of `--refresh-retry-seconds`: off, as design section 5 and Ory Hydra have it.
pub const REFRESH_RETRY_SECONDS: u64 = 0;

/// A family's record (JSON under `family_key`), kept as long as its newest refresh token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct FamilyRecord {
    client_id: String,
    grant_id: String,
    /// SHA-256 (hex) of the refresh token rotated last, and when (Unix seconds).
    rotated: String,
    rotated_at: u64,
    /// SHA-256 (hex) of the refresh and the access token issued for it.
    refresh: String,
    access: String,
}

/// Where the store keeps the key that signs refresh tokens (`tokens::generate_refresh`).
const REFRESH_KEY: &str = "refresh-token-key";

/// The keys that sign refresh tokens: the store's (`current`, made by whichever replica needed
/// one first), and the one this replica signed with before it found the store's changed
/// (`previous`, still good for checking the tokens it signed).
pub struct RefreshKeys {
    current: RefreshKey,
    previous: Option<RefreshKey>,
    /// When the store's key was last read.
    checked: std::time::Instant,
}

impl RefreshKeys {
    /// The key new refresh tokens are signed with.
    pub(super) fn signing(&self) -> &RefreshKey {
        &self.current
    }

    /// The family `token` names under either key (`tokens::refresh_family`). Tokens of a
    /// refresh token's length that neither signed are counted: made up, or cut from another.
    fn family_of(&self, token: &str) -> Option<FamilyId> {
        let family = tokens::refresh_family(&self.current, token)
            .or_else(|| tokens::refresh_family(self.previous.as_ref()?, token));
        if family.is_none() && token.len() == tokens::REFRESH_TOKEN_CHARS {
            metrics::counter!("gatehouse_refresh_tokens_unsigned_total").increment(1);
        }
        family
    }
}

/// How often a replica reads the store's key again.
const KEY_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);
/// How soon after a failed read it tries again.
const KEY_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// The store's key. When it has none (the first use ever, or a store that lost it), `ours` is
/// written (this replica's key, so a store that lost its data gets the key back the running
/// replicas sign with), or a fresh one; whichever replica writes first wins.
async fn stored_key(state: &AppState, ours: Option<&RefreshKey>) -> Result<RefreshKey, StoreError> {
    let store = &*state.store;
    let read = |k: Option<Vec<u8>>| -> Result<Option<RefreshKey>, StoreError> {
        k.map(|k| {
            RefreshKey::try_from(k.as_slice())
                .map_err(|_| StoreError::Corrupt(format!("{REFRESH_KEY} is not a 32-byte key")))
        })
        .transpose()
    };
    if let Some(key) = read(store.kv_get(REFRESH_KEY).await?)? {
        return Ok(key);
    }
    let offered = ours.copied().unwrap_or_else(tokens::new_refresh_key);
    store.kv_put_new(REFRESH_KEY, &offered, 0).await?;
    read(store.kv_get(REFRESH_KEY).await?)?
        .ok_or_else(|| StoreError::Corrupt(format!("{REFRESH_KEY} vanished as it was written")))
}

/// This replica's keys: read from the store at the first use, and again once a minute, so all
/// replicas move to the store's key within a minute should it change (a store that lost its
/// data while a new replica started). A replica keeps its previous key for checking the tokens
/// it signed. A failed re-read keeps the keys it has.
pub(super) async fn refresh_keys(state: &AppState) -> Result<Arc<RefreshKeys>, GatewayError> {
    let now = std::time::Instant::now();
    let have = state.refresh_keys.load_full();
    if let Some(keys) = &have
        && now.duration_since(keys.checked) < KEY_RECHECK
    {
        return Ok(keys.clone());
    }
    let stored = match stored_key(state, have.as_deref().map(|k| &k.current)).await {
        Ok(k) => k,
        Err(e) => match have {
            Some(keys) => {
                // Tried again in KEY_RETRY, not by every request meanwhile; unless another
                // request moved the keys on in the meantime.
                tracing::warn!(error = %e, "cannot read the refresh-token key again; keeping this one");
                let retry = now.checked_sub(KEY_RECHECK - KEY_RETRY).unwrap_or(now);
                let kept = Arc::new(RefreshKeys {
                    current: keys.current,
                    previous: keys.previous,
                    checked: retry,
                });
                state.refresh_keys.rcu(|latest| match latest {
                    Some(l) if Arc::ptr_eq(l, &keys) => Some(kept.clone()),
                    other => other.clone(),
                });
                return Ok(state.refresh_keys.load_full().unwrap_or(kept));
            }
            None => return Err(unavailable(e)),
        },
    };
    // From whatever is there now: another request may have moved it on meanwhile, with a read
    // newer than this one, which then stands.
    let keys = |previous| {
        Some(Arc::new(RefreshKeys {
            current: stored,
            previous,
            checked: now,
        }))
    };
    let before = state.refresh_keys.rcu(|latest| match latest.as_deref() {
        Some(l) if l.checked > now => latest.clone(),
        Some(l) if tokens::constant_time_eq(&l.current, &stored) => keys(l.previous),
        Some(l) => keys(Some(l.current)),
        None => keys(None),
    });
    let moved = before
        .as_deref()
        .is_some_and(|b| b.checked <= now && !tokens::constant_time_eq(&b.current, &stored));
    if moved {
        tracing::warn!("the store's refresh-token key changed; signing and checking with it now");
    }
    Ok(state
        .refresh_keys
        .load_full()
        .expect("refresh keys were just stored"))
}

/// A family's record, if it still has one.
async fn family_record(
    state: &AppState,
    id: &FamilyId,
) -> Result<Option<FamilyRecord>, GatewayError> {
    kv::get::<FamilyRecord>(&*state.store, &family_key(id))
        .await
        .map_err(unavailable)
}

/// Hashed, so the store's keys do not hold what the family's tokens carry.
fn family_key(id: &FamilyId) -> String {
    format!("family:{}", tokens::hash_hex(id))
}

/// Whether a token rotated at `rotated_at` may still be retried at `now` (`window` seconds;
/// 0 turns retries off). Pure.
fn within_retry(rotated_at: u64, now: u64, window: u64) -> bool {
    now < rotated_at.saturating_add(window)
}

fn parse_hash(hex_hash: &str) -> Option<TokenHash> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut hash).ok()?;
    Some(hash)
}

/// How the presented token is redeemed.
enum Redeem {
    /// A live refresh token.
    Live,
    /// The family's last rotated token, retried in time: through the pair issued for it, which
    /// nobody received (`unsent`, the hash of its refresh token).
    Retry {
        unsent: TokenHash,
        family: FamilyRecord,
    },
}

fn unknown() -> GatewayError {
    invalid_grant("the refresh token is invalid, expired, revoked or already used")
}

fn reused(client: &ClientRuntime, revoked: usize) -> GatewayError {
    tracing::warn!(client_id = %client.cfg.client_id, revoked, "rotated refresh token reused; family revoked");
    metrics::counter!("gatehouse_refresh_reuse_total").increment(1);
    unknown()
}

/// `gone`: cancelled once the client no longer waits for the answer (`to_completion`).
pub(super) async fn refresh_token(
    state: &AppState,
    snap: &Snapshot,
    client: &ClientRuntime,
    form: &Form,
    gone: &CancellationToken,
) -> Result<TokenResponse, GatewayError> {
    require_grant(client, GrantType::RefreshToken)?;
    let presented = form.require("refresh_token")?;
    let hash = tokens::hash(presented);
    let keys = refresh_keys(state).await?;
    let family_id = keys.family_of(presented);
    let (record, redeem) = match state.store.get_token(&hash).await.map_err(unavailable)? {
        Some(r) if r.kind == TokenKind::Refresh => (r, Redeem::Live),
        _ => not_live(state, client, &hash, family_id.as_ref()).await?,
    };
    // For a retry, `record` is the unsent refresh token's: same client, grant and scope.
    if about_to_expire(record.expires_at) {
        return Err(invalid_grant("the refresh token has expired"));
    }
    if record.client_id != client.cfg.client_id {
        return Err(invalid_grant(
            "the refresh token was issued to another client",
        ));
    }
    // A client id taken over by another Subscription (explicit spec.clientId) does not inherit
    // the old one's refresh tokens, which would mint access tokens for its Api.
    if record.subscription != client.cfg.subscription || record.api != snap.apis[client.api].cfg.id
    {
        return Err(invalid_grant(
            "the refresh token belongs to a subscription that no longer exists",
        ));
    }
    // A narrower scope may be asked for (RFC 6749 6); never a wider one. Checked before the
    // rotation: a refused request must leave the refresh token usable (spending it here would
    // make the client's next, correct refresh look like reuse and revoke the whole family).
    let scope = match form.get("scope") {
        // What was granted, less any scope the Api no longer offers.
        None => still_offered(snap, client, &record.scope)?,
        Some(req) => {
            let have: Vec<&str> = record.scope.split(' ').collect();
            if let Some(extra) = req.split(' ').find(|s| !s.is_empty() && !have.contains(s)) {
                return Err(oauth(
                    OAuthErrorCode::InvalidScope,
                    format!(
                        "scope {} was not granted to this refresh token",
                        super::shown(extra)
                    ),
                ));
            }
            check_scopes(snap, client, Some(req))?
        }
    };
    // A token from before families starts one.
    let id = family_id.unwrap_or_else(tokens::new_family);
    let family = Family {
        grant_id: &record.grant_id,
        id: &id,
        key: keys.signing(),
    };
    // The pair first, then the token is spent (see `answer_once`).
    let user_id = record.user_id.clone().unwrap_or_default();
    let pair = token_pair(state, snap, client, &user_id, &scope, &record.scope, family).await?;
    let ttl = snap.apis[client.api].cfg.refresh_token_ttl_seconds;
    let rotation = Rotation {
        presented: &hash,
        record: &record,
        family: &id,
        legacy: family_id.is_none(),
        ttl,
    };
    if gone.is_cancelled() {
        // Nobody waits for this answer any more: nothing is spent.
        discard(state, &pair, false).await;
        return Err(client_gone());
    }
    let spent = rotate(state, &rotation, &pair, &redeem).await;
    let keep_refresh = match spent {
        Err(_) => kept_after_failed_spend(state, &rotation, &redeem).await,
        Ok(_) => false,
    };
    let presented = Presented {
        grant_id: &record.grant_id,
        expires_at: record.expires_at,
        keep_refresh,
    };
    let answer = answer_once(state, pair, spent, presented, |n| reused(client, n)).await?;
    if let Redeem::Retry { family, .. } = &redeem {
        tracing::info!(client_id = %client.cfg.client_id, grant_id = %family.grant_id, "refresh retried with the token rotated last; the unsent pair was replaced");
        metrics::counter!("gatehouse_refresh_retries_total").increment(1);
    }
    if matches!(redeem, Redeem::Live) && gone.is_cancelled() {
        // The client went away while the answer was made: undone, so its retry with the token
        // it has is a plain refresh rather than reuse.
        undo(state, &hash, &record, &answer).await;
        return Err(client_gone());
    }
    Ok(answer)
}

fn client_gone() -> GatewayError {
    oauth(
        OAuthErrorCode::TemporarilyUnavailable,
        "the client went away before the answer",
    )
}

/// After a spend whose outcome is unknown (a store error): whether the new refresh token stays
/// for the client's retry. When the token to spend (for a retry, the unsent one) is still live,
/// the spend did not happen: the new pair goes, and a retry puts the family's record back, so
/// the client's retry finds things as they were. When it is gone, whose spend that was is
/// unknown (a concurrent use may have taken it), so nothing is put back: the family's record
/// names the new pair, which a retry within `--refresh-retry-seconds` redeems; without a
/// window the retry is reuse.
async fn kept_after_failed_spend(state: &AppState, r: &Rotation<'_>, redeem: &Redeem) -> bool {
    let (to_spend, previous) = match redeem {
        Redeem::Live => (r.presented, None),
        Redeem::Retry { unsent, family } => (unsent, Some(family)),
    };
    match state.store.get_token(to_spend).await {
        Ok(Some(_)) => {
            if let Some(family) = previous
                && let Err(e) = kv::put(&*state.store, &family_key(r.family), family, r.ttl).await
            {
                tracing::warn!(error = %e, "cannot put a refresh family's record back");
            }
            false
        }
        _ => state.refresh_retry_secs > 0,
    }
}

/// Undoes a rotation whose answer nobody will read. The new refresh token is taken first: if a
/// retry redeemed it meanwhile, the rotation stands (putting the old token back would give the
/// family two live chains). Then its access token goes and the presented token comes back.
async fn undo(
    state: &AppState,
    presented: &TokenHash,
    record: &TokenRecord,
    answer: &TokenResponse,
) {
    let Some(new_refresh) = answer.refresh_token.as_deref() else {
        return;
    };
    match state.store.revoke_token(&tokens::hash(new_refresh)).await {
        Ok(Some(_)) => {}
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot undo a refresh whose client went away");
            return;
        }
    }
    let _ = state
        .store
        .revoke_token(&tokens::hash(&answer.access_token))
        .await;
    restore(state, presented, record).await;
}

/// Puts a spent refresh token back, unless its grant was revoked meanwhile. A revocation that
/// found it gone must not miss it, so the grant is checked after the token is back (as
/// `token_pair` does for new tokens), also when the put reported an error (it may have landed);
/// when the check fails, the grant is revoked rather than risk a revoked token coming back.
async fn restore(state: &AppState, hash: &TokenHash, record: &TokenRecord) {
    if let Err(e) = state.store.put_token(*hash, record.clone()).await {
        tracing::warn!(error = %e, "cannot put back a refresh token whose rotation went unanswered");
    }
    if grant_revoked(state, &record.grant_id).await.unwrap_or(true)
        && let Err(e) = state.store.revoke_grant(&record.grant_id).await
    {
        tracing::error!(error = %e, grant_id = %record.grant_id, "cannot revoke a grant whose token was put back");
    }
}

/// A presented token that is not a live refresh token: the family's last rotated one retried in
/// time, or reuse of a rotated one (the family is revoked), or unknown.
async fn not_live(
    state: &AppState,
    client: &ClientRuntime,
    hash: &TokenHash,
    family_id: Option<&FamilyId>,
) -> Result<(Arc<TokenRecord>, Redeem), GatewayError> {
    let Some(id) = family_id else {
        // From before families: its rotation left a marker.
        let marker = rotated_key(hash);
        return Err(
            match revoke_marked_grant(state, &marker, &client.cfg.client_id).await? {
                Some(n) => reused(client, n),
                None => unknown(),
            },
        );
    };
    let Some(family) = family_record(state, id).await? else {
        return Err(unknown());
    };
    // Another client sending a token it saw cannot end the owner's family; one that was
    // revoked (signed out, or a replayed code) is not reuse.
    if family.client_id != client.cfg.client_id || grant_revoked(state, &family.grant_id).await? {
        return Err(unknown());
    }
    let last = tokens::constant_time_eq(hex::encode(hash).as_bytes(), family.rotated.as_bytes());
    if last
        && within_retry(family.rotated_at, unix_now(), state.refresh_retry_secs)
        && let Some(unsent) = parse_hash(&family.refresh)
    {
        let record = state.store.get_token(&unsent).await.map_err(unavailable)?;
        let unsent_refresh =
            record.filter(|r| r.kind == TokenKind::Refresh && r.grant_id == family.grant_id);
        if let Some(r) = unsent_refresh {
            return Ok((r, Redeem::Retry { unsent, family }));
        }
        // The pair issued for it was used or retried already: two holders.
    }
    // A rotated token of this family (or one made up with its id, which takes having seen one
    // of its tokens).
    let n = end_family(state, &family.grant_id, Some(id)).await?;
    if n == 0 {
        // The family was over already (expired, or revoked more than a day ago): no alarm.
        return Err(unknown());
    }
    Err(reused(client, n))
}

/// What one rotation writes.
struct Rotation<'a> {
    presented: &'a TokenHash,
    record: &'a TokenRecord,
    family: &'a FamilyId,
    /// The presented token is from before families.
    legacy: bool,
    /// Seconds the new refresh token lives.
    ttl: u64,
}

/// Records the rotation, then spends the presented token (for a retry, the unsent pair).
/// Returns whether this request spent it. The records are written first, so a second use finds
/// the token or the record, never neither.
async fn rotate(
    state: &AppState,
    r: &Rotation<'_>,
    pair: &TokenResponse,
    redeem: &Redeem,
) -> Result<bool, StoreError> {
    let store = &*state.store;
    let now = unix_now();
    if r.legacy {
        let remember = r.record.expires_at.saturating_sub(now).max(1);
        let owner = marker_value(&r.record.client_id, &r.record.grant_id);
        kv::put(store, &rotated_key(r.presented), &owner, remember).await?;
    }
    let (rotated, rotated_at) = match redeem {
        Redeem::Live => (hex::encode(r.presented), now),
        // A retry does not move the window: a client retries for `--refresh-retry-seconds`
        // after the rotation, however many times.
        Redeem::Retry { family, .. } => (family.rotated.clone(), family.rotated_at),
    };
    let next = FamilyRecord {
        client_id: r.record.client_id.clone(),
        grant_id: r.record.grant_id.clone(),
        rotated,
        rotated_at,
        refresh: pair
            .refresh_token
            .as_deref()
            .map(|t| hex::encode(tokens::hash(t)))
            .unwrap_or_default(),
        access: hex::encode(tokens::hash(&pair.access_token)),
    };
    // As long as the newest token of the family; older ones expire before it (unless the Api's
    // refresh lifetime was shortened since: those then outlive the record, and come back as
    // unknown rather than reuse).
    let keep = r.ttl.max(r.record.expires_at.saturating_sub(now)).max(1);
    kv::put(store, &family_key(r.family), &next, keep).await?;
    match redeem {
        Redeem::Live => Ok(store.revoke_token(r.presented).await?.is_some()),
        Redeem::Retry { unsent, family } => {
            // The unsent pair's access token first: should taking its refresh token fail after
            // this, the client retries; the other way round, a failure here would leave it live.
            if let Some(access) = parse_hash(&family.access) {
                store.revoke_token(&access).await?;
            }
            Ok(store.revoke_token(unsent).await?.is_some())
        }
    }
}

/// Revokes a grant, and forgets its family's record when the family is known: its rotated
/// tokens are then simply unknown. Returns how many tokens went.
async fn end_family(
    state: &AppState,
    grant_id: &str,
    family: Option<&FamilyId>,
) -> Result<usize, GatewayError> {
    let n = revoke_family(state, grant_id).await.map_err(unavailable)?;
    if let Some(id) = family {
        // Best effort: what remains is a record of a revoked grant, which `not_live` ignores.
        let _ = state.store.kv_delete(&family_key(id)).await;
    }
    Ok(n)
}

/// `/oauth2/revoke` for a refresh token: a live one of this client ends its family; one that
/// was rotated already ends it too (a sign-out racing a background refresh, or a holder who
/// does not know the token was stolen and refreshed by someone else). Returns how many tokens
/// went, or None when the token is nothing of this client's.
pub(super) async fn revoke(
    state: &AppState,
    client: &ClientRuntime,
    token: &str,
    live: Option<&TokenRecord>,
) -> Result<Option<usize>, GatewayError> {
    let family_id = refresh_keys(state).await?.family_of(token);
    if let Some(record) = live {
        if record.client_id != client.cfg.client_id {
            return Ok(None);
        }
        return end_family(state, &record.grant_id, family_id.as_ref())
            .await
            .map(Some);
    }
    let Some(id) = family_id else {
        let marker = rotated_key(&tokens::hash(token));
        return revoke_marked_grant(state, &marker, &client.cfg.client_id).await;
    };
    match family_record(state, &id).await? {
        Some(f) if f.client_id == client.cfg.client_id => {
            end_family(state, &f.grant_id, Some(&id)).await.map(Some)
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes this replica's keys due for a re-read of the store's.
    fn due(state: &AppState) {
        let keys = state.refresh_keys.load_full().expect("keys");
        let long_ago = std::time::Instant::now()
            .checked_sub(KEY_RECHECK + std::time::Duration::from_secs(1))
            .expect("the monotonic clock is older than a minute");
        state.refresh_keys.store(Some(Arc::new(RefreshKeys {
            current: keys.current,
            previous: keys.previous,
            checked: long_ago,
        })));
    }

    /// The store's key replaced (a flush, then another replica made a new one): within the
    /// re-read interval this replica moves to it and still checks its own older tokens; a store
    /// that lost its key gets this replica's back.
    #[tokio::test]
    async fn a_replica_follows_the_stores_key_and_gives_a_store_its_key_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = AppState::for_tests(dir.path());
        let old = *refresh_keys(&state).await.unwrap().signing();
        let family = tokens::new_family();
        let mine = tokens::generate_refresh(&old, &family);
        let new = tokens::new_refresh_key();
        state.store.kv_put(REFRESH_KEY, &new, 0).await.unwrap();
        let theirs = tokens::generate_refresh(&new, &family);
        assert_eq!(
            refresh_keys(&state).await.unwrap().family_of(&theirs),
            None,
            "not read again yet"
        );
        due(&state);
        assert_eq!(
            refresh_keys(&state).await.unwrap().family_of(&theirs),
            Some(family)
        );
        assert_eq!(refresh_keys(&state).await.unwrap().signing(), &new);
        assert_eq!(
            refresh_keys(&state).await.unwrap().family_of(&mine),
            Some(family)
        );
        let forged = format!("{}{}", &theirs[..22], "A".repeat(64));
        assert_eq!(refresh_keys(&state).await.unwrap().family_of(&forged), None);
        assert_eq!(
            refresh_keys(&state)
                .await
                .unwrap()
                .family_of(&tokens::generate()),
            None
        );

        state.store.kv_delete(REFRESH_KEY).await.unwrap();
        due(&state);
        assert_eq!(refresh_keys(&state).await.unwrap().signing(), &new);
        let back = state.store.kv_get(REFRESH_KEY).await.unwrap();
        assert_eq!(
            back.as_deref(),
            Some(&new[..]),
            "the store did not get the key back"
        );
    }

    #[test]
    fn retries_are_within_the_window_only() {
        assert!(within_retry(1_000, 1_000, 30));
        assert!(within_retry(1_000, 1_029, 30));
        assert!(!within_retry(1_000, 1_030, 30));
        assert!(!within_retry(1_000, 1_000, 0), "0 turns retries off");
        assert!(within_retry(u64::MAX - 1, u64::MAX - 1, 30));
    }

    #[test]
    fn family_keys_do_not_show_the_family_id() {
        let id = tokens::new_family();
        let key = family_key(&id);
        assert!(key.starts_with("family:") && key.len() == "family:".len() + 64);
        assert!(!key.contains(&hex::encode(id)));
        assert_ne!(family_key(&tokens::new_family()), key);
    }

    #[test]
    fn hashes_parse_from_hex_only() {
        let h = tokens::hash("t");
        assert_eq!(parse_hash(&hex::encode(h)), Some(h));
        assert_eq!(parse_hash(""), None);
        assert_eq!(parse_hash(&"zz".repeat(32)), None);
        assert_eq!(parse_hash(&hex::encode(&h[..31])), None);
    }
}
