use super::*;
use gatehouse_crds::manifests::parse_documents;

struct Seq(u32);

impl Generator for Seq {
    fn secret(&mut self) -> String {
        self.0 += 1;
        format!("secret-{:032}", self.0)
    }
}

const YAML: &str = r#"
apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {name: basic, namespace: demo, generation: 1}
spec: {rateLimits: [{requests: 10, per: second}]}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {name: gold, namespace: demo, generation: 1}
spec: {requiresApproval: true}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {name: mobile, namespace: demo, generation: 2}
spec:
  pathPrefix: /mobile
  upstream: {url: "http://backend:8080"}
  plans: [basic, gold]
  auth: {grants: [authorization_code, refresh_token, client_credentials]}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: app, namespace: demo, generation: 1}
spec: {clientType: public, redirectUris: ["myapp://cb"]}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: svc, namespace: demo, generation: 1}
spec: {clientType: confidential}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: app-mobile, namespace: demo, uid: u-1, generation: 1}
spec: {application: app, api: mobile, plan: basic}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: svc-mobile, namespace: demo, uid: u-2, generation: 1}
spec: {application: svc, api: mobile, plan: basic, grants: [client_credentials]}
"#;

fn resources(extra: &str) -> Resources {
    let mut r = Resources::default();
    let errors = parse_documents(&format!("{YAML}---\n{extra}"), "test", &mut r);
    assert!(errors.is_empty(), "{errors:?}");
    r
}

/// The uid the test's "API server" gives a created Secret: a new one each time, as the real
/// one does for a Secret deleted and created again under the same name.
fn uid_of(secret: &NewSecret) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("uid-{n}-of-{}", secret.name)
}

/// Applies a plan's writes to the resources, as the API server would, with the statuses the
/// controller writes (each created Secret's uid recorded).
fn apply(mut r: Resources, p: &Plan) -> Resources {
    let mut statuses = p.statuses.clone();
    for s in &p.new_secrets {
        let uid = uid_of(s);
        record_created(&mut statuses, s, &uid);
        let mut secret = secret_object(s);
        secret.metadata.uid = Some(uid);
        let data = secret.string_data.take().unwrap();
        secret.data = Some(
            data.into_iter()
                .map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes())))
                .collect(),
        );
        r.secrets.push(secret);
    }
    for u in &p.client_id_updates {
        let secret = r
            .secrets
            .iter_mut()
            .find(|s| s.name_any() == u.name)
            .expect("the Secret to update");
        secret.data.get_or_insert_default().insert(
            CLIENT_ID_KEY.to_string(),
            k8s_openapi::ByteString(u.client_id.clone().into_bytes()),
        );
    }
    for u in &statuses {
        let set = |st: &mut Option<ResourceStatus>| *st = Some(u.status.clone());
        match u.kind {
            Kind::Api => r
                .apis
                .iter_mut()
                .filter(|o| o.name_any() == u.name)
                .for_each(|o| set(&mut o.status)),
            Kind::Plan => r
                .plans
                .iter_mut()
                .filter(|o| o.name_any() == u.name)
                .for_each(|o| set(&mut o.status)),
            Kind::Application => r
                .applications
                .iter_mut()
                .filter(|o| o.name_any() == u.name)
                .for_each(|o| set(&mut o.status)),
            Kind::Subscription => r
                .subscriptions
                .iter_mut()
                .filter(|o| o.name_any() == u.name)
                .for_each(|o| set(&mut o.status)),
        }
    }
    r
}

fn status_of<'a>(p: &'a Plan, name: &str) -> &'a ResourceStatus {
    &p.statuses
        .iter()
        .find(|u| u.name == name)
        .expect("status update")
        .status
}

#[test]
fn first_pass_generates_ids_and_secrets_and_second_pass_writes_nothing() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "2026-01-01T00:00:00Z");
    // every resource gets a status
    assert_eq!(p1.statuses.len(), 7);
    let app = status_of(&p1, "app-mobile");
    assert_eq!(app.phase.as_deref(), Some("Active"));
    assert_eq!(
        app.client_id.as_deref(),
        Some(generated_client_id("demo", "app-mobile", "u-1").as_str())
    );
    assert_eq!(app.credentials_secret, None, "public clients get no secret");
    assert_eq!(app.observed_generation, Some(1));
    assert_eq!(app.conditions[0].type_, "Ready");
    assert_eq!(app.conditions[0].status, "True");
    // the confidential subscription gets a Secret with a generated secret
    assert_eq!(p1.new_secrets.len(), 1);
    let s = &p1.new_secrets[0];
    assert_eq!(
        (s.name.as_str(), s.subscription_uid.as_str()),
        ("svc-mobile-credentials", "u-2")
    );
    assert_eq!(
        status_of(&p1, "svc-mobile").credentials_secret.as_deref(),
        Some("svc-mobile-credentials")
    );
    assert_eq!(p1.compiled.config.clients.len(), 2);
    let svc = p1
        .compiled
        .config
        .clients
        .iter()
        .find(|c| c.subscription == "demo/svc-mobile")
        .unwrap();
    assert!(svc.secret_sha256.is_some());

    // Second pass over the written state: no writes, same config.
    let r2 = apply(r, &p1);
    let p2 = plan(r2, &Known::default(), &mut g, "2026-01-01T00:01:00Z");
    assert!(p2.new_secrets.is_empty(), "{:?}", p2.new_secrets);
    assert!(p2.statuses.is_empty(), "{:?}", p2.statuses);
    assert_eq!(p2.compiled.config.hash, p1.compiled.config.hash);
}

#[test]
fn pending_approval_gets_no_secret_until_approved() {
    let extra = r#"apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: svc-gold, namespace: demo, uid: u-3}
spec: {application: svc, api: mobile, plan: gold, clientId: svc-gold, grants: [client_credentials]}
"#;
    let mut g = Seq(0);
    let p = plan(resources(extra), &Known::default(), &mut g, "t");
    let st = status_of(&p, "svc-gold");
    assert_eq!(st.phase.as_deref(), Some("PendingApproval"));
    assert_eq!(st.credentials_secret, None);
    assert!(p.new_secrets.iter().all(|s| s.subscription != "svc-gold"));
    assert!(
        p.compiled
            .config
            .clients
            .iter()
            .all(|c| c.client_id != "svc-gold")
    );

    let approved = extra.replace(
        "uid: u-3}",
        "uid: u-3, annotations: {gatehouse.dev/approved: \"true\"}}",
    );
    let p = plan(resources(&approved), &Known::default(), &mut g, "t");
    assert_eq!(status_of(&p, "svc-gold").phase.as_deref(), Some("Active"));
    assert!(p.new_secrets.iter().any(|s| s.subscription == "svc-gold"));
    assert!(
        p.compiled
            .config
            .clients
            .iter()
            .any(|c| c.client_id == "svc-gold")
    );
}

#[test]
fn an_invalid_resource_does_not_block_the_others() {
    let extra = r#"apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: broken, namespace: demo}
spec: {application: nope, api: mobile, plan: basic}
"#;
    let mut g = Seq(0);
    let p = plan(resources(extra), &Known::default(), &mut g, "t");
    let st = status_of(&p, "broken");
    assert_eq!(st.phase.as_deref(), Some("Invalid"));
    assert_eq!(st.conditions[0].status, "False");
    assert!(
        st.conditions[0].message.contains("nope"),
        "{}",
        st.conditions[0].message
    );
    assert_eq!(p.compiled.config.clients.len(), 2);
}

#[test]
fn transition_time_changes_only_when_readiness_changes() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    let mut r2 = apply(r, &p1);
    // the plan disappears: the subscriptions become Invalid, with a new transition time
    r2.plans.retain(|p| p.name_any() != "basic");
    let p2 = plan(r2.clone(), &Known::default(), &mut g, "t2");
    let st = status_of(&p2, "app-mobile");
    assert_eq!(st.phase.as_deref(), Some("Invalid"));
    assert_eq!(st.conditions[0].last_transition_time.as_deref(), Some("t2"));
    assert_eq!(
        st.client_id.as_deref(),
        Some(generated_client_id("demo", "app-mobile", "u-1").as_str()),
        "the client id is kept"
    );
    // The applications stay Ready: nothing is rewritten for them.
    assert!(
        p2.statuses.iter().all(|u| u.kind != Kind::Application),
        "{:?}",
        p2.statuses
    );
}

/// After a generated client id, setting spec.clientId: the status shows the id the gateways
/// accept now.
#[test]
fn the_status_names_the_client_id_in_use() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "2026-01-01T00:00:00Z");
    assert_eq!(
        status_of(&p1, "app-mobile").client_id.as_deref(),
        Some(generated_client_id("demo", "app-mobile", "u-1").as_str())
    );
    let mut r2 = apply(r, &p1);
    for s in r2
        .subscriptions
        .iter_mut()
        .filter(|s| s.name_any() == "app-mobile")
    {
        s.spec.client_id = Some("custom-id".into());
    }
    let p2 = plan(r2, &Known::default(), &mut g, "2026-01-01T00:01:00Z");
    assert!(
        p2.compiled
            .config
            .clients
            .iter()
            .any(|c| c.client_id == "custom-id")
    );
    assert_eq!(
        status_of(&p2, "app-mobile").client_id.as_deref(),
        Some("custom-id")
    );
}

/// RFC 7396 merge, as the API server applies a status patch.
fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// A status patch leaves exactly the new status, also when it has fewer fields than the old one
/// (a confidential subscription that moved from the generated Secret to clientSecretRef).
#[test]
fn a_status_patch_removes_what_the_new_status_lacks() {
    let old = ResourceStatus {
        phase: Some("Active".into()),
        observed_generation: Some(1),
        client_id: Some("svc-mobile-g1".into()),
        credentials_secret: Some("svc-mobile-credentials".into()),
        credentials_secret_uid: Some("uid-of-svc-mobile-credentials".into()),
        conditions: vec![],
    };
    let new = ResourceStatus {
        credentials_secret: None,
        credentials_secret_uid: None,
        observed_generation: Some(2),
        ..old.clone()
    };
    let mut object = serde_json::json!({ "spec": {}, "status": old });
    merge(&mut object, &status_patch(&new, None));
    let after: ResourceStatus = serde_json::from_value(object["status"].clone()).unwrap();
    assert_eq!(after, new);
    assert!(object["status"].get("credentialsSecret").is_none());
}

/// A generated id is derived from namespace, name and uid: stable across passes and operator
/// replicas, different for a subscription created again under the same name.
#[test]
fn generated_client_ids_are_derived_from_namespace_name_and_uid() {
    let id = generated_client_id("demo", "app-mobile", "u-1");
    assert!(
        id.starts_with("app-mobile-") && id.len() == "app-mobile-".len() + 8,
        "{id}"
    );
    assert_eq!(id, generated_client_id("demo", "app-mobile", "u-1"));
    for other in [
        generated_client_id("demo", "app-mobile", "u-9"),
        generated_client_id("prod", "app-mobile", "u-1"),
        generated_client_id("demo", "app-mobil", "u-1"),
    ] {
        assert_ne!(id, other);
    }
}

/// A pass that does not see the status the previous one wrote (the watch lags, or another
/// replica led) arrives at the same id. An id an older operator generated at random is kept
/// in the operator's credentials Secret too: taken back from it while the status records that
/// Secret, never from a Secret nothing records (its clientId is its writer's choice; a
/// Subscription created again under the same name would get an id its predecessor's tokens
/// still name).
#[test]
fn a_lost_status_does_not_change_the_client_id() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    let svc_id = status_of(&p1, "svc-mobile").client_id.clone().unwrap();
    let app_id = status_of(&p1, "app-mobile").client_id.clone().unwrap();
    // The Secret exists, the statuses were not seen.
    let applied = apply(r.clone(), &p1);
    let mut r2 = applied.clone();
    for s in &mut r2.subscriptions {
        s.status = None;
    }
    let p2 = plan(r2.clone(), &Known::default(), &mut g, "t2");
    assert_eq!(
        status_of(&p2, "svc-mobile").client_id.as_deref(),
        Some(svc_id.as_str())
    );
    assert_eq!(
        status_of(&p2, "app-mobile").client_id.as_deref(),
        Some(app_id.as_str())
    );
    assert!(p2.new_secrets.is_empty() && p2.client_id_updates.is_empty());
    // An older operator's random id in the recorded Secret, the status without a client id.
    let mut r3 = applied;
    r3.secrets[0].data.as_mut().unwrap().insert(
        CLIENT_ID_KEY.to_string(),
        k8s_openapi::ByteString(b"svc-mobile-0ld1d000".to_vec()),
    );
    for s in &mut r3.subscriptions {
        if let Some(st) = s.status.as_mut() {
            st.client_id = None;
        }
    }
    let p3 = plan(r3.clone(), &Known::default(), &mut g, "t3");
    assert_eq!(
        status_of(&p3, "svc-mobile").client_id.as_deref(),
        Some("svc-mobile-0ld1d000")
    );
    assert!(p3.client_id_updates.is_empty());
    // The same Secret when nothing records it: the id is derived again, and nothing is written
    // into that Secret.
    let mut r4 = r3;
    for s in &mut r4.subscriptions {
        s.status = None;
    }
    let p4 = plan(r4, &Known::default(), &mut g, "t4");
    assert_eq!(
        status_of(&p4, "svc-mobile").client_id.as_deref(),
        Some(svc_id.as_str())
    );
    assert!(p4.client_id_updates.is_empty());
}

/// spec.clientId set after the Secret was made: the Secret's clientId follows (its secret
/// stays), so a client reading the Secret gets the id the gateways accept.
#[test]
fn the_credentials_secret_follows_a_changed_client_id() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    let mut r2 = apply(r, &p1);
    let secret_before = r2.secrets[0].data.as_ref().unwrap()[SECRET_KEY].clone();
    for s in r2
        .subscriptions
        .iter_mut()
        .filter(|s| s.name_any() == "svc-mobile")
    {
        s.spec.client_id = Some("partner".into());
    }
    let p2 = plan(r2.clone(), &Known::default(), &mut g, "t2");
    assert_eq!(
        p2.client_id_updates,
        [ClientIdUpdate {
            namespace: "demo".into(),
            name: "svc-mobile-credentials".into(),
            uid: r2.secrets[0].metadata.uid.clone().unwrap(),
            client_id: "partner".into(),
        }]
    );
    let r3 = apply(r2, &p2);
    let data = r3.secrets[0].data.as_ref().unwrap();
    assert_eq!(data[CLIENT_ID_KEY].0, b"partner");
    assert_eq!(data[SECRET_KEY], secret_before);
    let p3 = plan(r3, &Known::default(), &mut g, "t3");
    assert!(p3.client_id_updates.is_empty() && p3.statuses.is_empty());
}

/// A Secret the API server refuses: the subscription says so in its status (and keeps its
/// client id); the same failure again writes nothing new.
#[test]
fn a_refused_credentials_secret_is_reported_in_the_status() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    let planned = p1.statuses.iter().find(|u| u.name == "svc-mobile");
    let u = credentials_failed(&r, planned, "demo", "svc-mobile", "quota exceeded", "t1")
        .expect("a status to write");
    assert_eq!(u.status.phase.as_deref(), Some("Invalid"));
    assert_eq!(u.status.client_id, planned.unwrap().status.client_id);
    assert_eq!(u.status.credentials_secret, None);
    let c = &u.status.conditions[0];
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", CREDENTIALS_SECRET_FAILED)
    );
    assert!(c.message.contains("svc-mobile-credentials") && c.message.contains("quota exceeded"));
    // Written, then failing the same way: nothing to write.
    let mut r2 = r.clone();
    for s in r2
        .subscriptions
        .iter_mut()
        .filter(|s| s.name_any() == "svc-mobile")
    {
        s.status = Some(u.status.clone());
    }
    assert_eq!(
        credentials_failed(&r2, None, "demo", "svc-mobile", "quota exceeded", "t2"),
        None
    );
}

/// A pass whose publish fails: what would be Ready says Ready=False/PublishFailed (phase kept),
/// other verdicts are written as planned; the same failure again writes nothing new, and the
/// first pass that publishes makes them Ready.
#[test]
fn a_failed_publish_keeps_resources_from_reading_ready() {
    let mut g = Seq(0);
    let r = resources(
        "apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: app-gold, namespace: demo, uid: u-3, generation: 1}
spec: {application: svc, api: mobile, plan: gold, grants: [client_credentials]}
",
    );
    let mut p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    let (ready, other): (Vec<_>, Vec<_>) = p1.statuses.iter().cloned().partition(says_ready);
    assert!(!ready.is_empty() && !other.is_empty(), "{:?}", p1.statuses);
    let failed: Vec<StatusUpdate> = ready
        .iter()
        .map(|u| publish_failed(&r, u.clone(), "t1").expect("a status to write"))
        .collect();
    for (before, after) in ready.iter().zip(&failed) {
        assert_eq!(after.status.phase, before.status.phase);
        assert_eq!(
            after.status.observed_generation,
            before.status.observed_generation
        );
        assert_eq!(after.status.client_id, before.status.client_id);
        let c = &after.status.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", PUBLISH_FAILED)
        );
        assert!(
            c.message
                .contains("cannot publish the gateways' configuration"),
            "{}",
            c.message
        );
        assert_eq!(c.last_transition_time.as_deref(), Some("t1"));
    }
    p1.statuses = failed.into_iter().chain(other).collect();
    let r2 = apply(r, &p1);

    // Still failing: compile plans Ready again, and the failure turns each back into exactly
    // what the resource says (its transition time kept).
    let p2 = plan(r2.clone(), &Known::default(), &mut g, "t2");
    assert!(!p2.statuses.is_empty());
    for u in p2.statuses.iter().cloned() {
        assert!(says_ready(&u), "{u:?}");
        assert_eq!(publish_failed(&r2, u, "t2"), None);
    }
    // Published: written as planned, Ready since t2.
    let r3 = apply(r2, &p2);
    assert!(
        plan(r3, &Known::default(), &mut g, "t3")
            .statuses
            .is_empty()
    );
    for u in &p2.statuses {
        let c = &u.status.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.last_transition_time.as_deref()),
            ("True", Some("t2"))
        );
    }
}

/// svc-mobile's Secret as someone allowed to create Secrets (not to read them) writes it: the
/// generated name, an ownerReference naming the subscription as its controller (its uid is
/// readable by all who can list Subscriptions), and a secret of the writer's choice.
fn forged_secret() -> Secret {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    let mut secret = Secret::default();
    secret.metadata.name = Some("svc-mobile-credentials".into());
    secret.metadata.namespace = Some("demo".into());
    secret.metadata.uid = Some("uid-of-the-forged-secret".into());
    secret.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "gatehouse.dev/v1alpha1".into(),
        kind: "Subscription".into(),
        name: "svc-mobile".into(),
        uid: "u-2".into(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    secret.data = Some(
        [(
            SECRET_KEY.to_string(),
            k8s_openapi::ByteString(b"chosen-by-the-writer-0123456789".to_vec()),
        )]
        .into(),
    );
    secret
}

fn svc_verdict(p: &Plan) -> &Verdict {
    p.compiled
        .verdict(Kind::Subscription, "demo", "svc-mobile")
        .expect("a verdict")
}

fn svc_mut(r: &mut Resources) -> &mut Subscription {
    r.subscriptions
        .iter_mut()
        .find(|s| s.name_any() == "svc-mobile")
        .expect("svc-mobile")
}

fn svc_status(r: &Resources) -> ResourceStatus {
    r.subscriptions
        .iter()
        .find(|s| s.name_any() == "svc-mobile")
        .and_then(|s| s.status.clone())
        .expect("a status")
}

fn svc_client(p: &Plan) -> Option<&gatehouse_crds::ClientConfig> {
    p.compiled
        .config
        .clients
        .iter()
        .find(|c| c.subscription == "demo/svc-mobile")
}

/// A Secret planted under the generated name with a forged ownerReference, before the operator
/// created one (while the subscription waits for approval) or after the operator's was
/// deleted, is never adopted: the status says to delete it, and once it is gone the operator
/// creates its own.
#[test]
fn a_planted_secret_with_a_forged_owner_is_never_adopted() {
    let mut g = Seq(0);
    let approved = resources("").subscriptions;
    let mut r = resources("");
    // Waiting for approval: already refused, so an administrator sees why before approving.
    svc_mut(&mut r).spec.plan = "gold".into();
    r.secrets.push(forged_secret());
    let p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    assert_eq!(
        status_of(&p1, "svc-mobile").phase.as_deref(),
        Some("Invalid")
    );
    let mut r2 = apply(r, &p1);
    // Approved (here: moved to the plan without approval).
    r2.subscriptions = approved
        .into_iter()
        .map(|mut s| {
            let old = r2
                .subscriptions
                .iter()
                .find(|o| o.name_any() == s.name_any());
            s.status = old.and_then(|o| o.status.clone());
            s
        })
        .collect();
    let p2 = plan(r2.clone(), &Known::default(), &mut g, "t2");
    let v = svc_verdict(&p2);
    assert_eq!(v.phase, Phase::Invalid);
    assert!(
        v.message
            .contains("is not this subscription's generated credentials"),
        "{}",
        v.message
    );
    let st = svc_status(&apply(r2.clone(), &p2));
    assert_eq!(st.credentials_secret_uid, None);
    assert!(svc_client(&p2).is_none());
    assert!(p2.new_secrets.is_empty(), "a Secret of that name exists");

    // Deleted: the operator creates its own and records its uid.
    let mut r3 = apply(r2, &p2);
    r3.secrets.clear();
    let p3 = plan(r3.clone(), &Known::default(), &mut g, "t3");
    assert_eq!(p3.new_secrets.len(), 1);
    let generated = p3.new_secrets[0].clone();
    let r4 = apply(r3, &p3);
    assert_eq!(
        svc_status(&r4).credentials_secret_uid,
        r4.secrets[0].metadata.uid
    );
    let p4 = plan(r4.clone(), &Known::default(), &mut g, "t4");
    assert!(p4.statuses.is_empty(), "{:?}", p4.statuses);
    assert_eq!(
        svc_client(&p4).and_then(|c| c.secret_sha256.clone()),
        Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            generated.client_secret.as_bytes()
        )))
    );

    // The operator's Secret deleted and a forged one planted before the operator saw it: the
    // uid recorded is the deleted one's, so the planted one is refused too.
    let mut r5 = r4;
    r5.secrets = vec![forged_secret()];
    let p5 = plan(r5, &Known::default(), &mut g, "t5");
    assert_eq!(svc_verdict(&p5).phase, Phase::Invalid);
    assert!(svc_client(&p5).is_none());
}

/// The pass after the one that created the Secret may see the Secret but not yet the status
/// that recorded its uid (the watches deliver independently): the operator remembers what it
/// created, so its own Secret is not refused in between, and forgets it once the status shows it.
#[test]
fn the_operators_own_secret_survives_a_status_not_seen_yet() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    let made = p1.new_secrets[0].clone();
    let applied = apply(r.clone(), &p1);
    let uid = applied.secrets[0].metadata.uid.clone().unwrap();
    // The Secret seen, the statuses not.
    let mut lagging = applied.clone();
    lagging.subscriptions = r.subscriptions.clone();
    let mut created = Created::new();
    created.insert((made.namespace.clone(), made.name.clone()), uid.clone());
    let known = Known {
        created: created.clone(),
        ..Default::default()
    };
    let p2 = plan(lagging.clone(), &known, &mut g, "t2");
    assert!(svc_client(&p2).is_some());
    assert_eq!(
        status_of(&p2, "svc-mobile")
            .credentials_secret_uid
            .as_deref(),
        Some(uid.as_str())
    );
    assert!(p2.new_secrets.is_empty());
    // Without that memory (another process) the Secret would be refused: the check is real.
    let p2b = plan(lagging.clone(), &Known::default(), &mut g, "t2");
    assert!(svc_client(&p2b).is_none());
    // Remembered only while the status read back does not record it.
    prune_created(&mut created, &lagging);
    assert_eq!(created.len(), 1);
    prune_created(&mut created, &applied);
    assert!(created.is_empty());
    // And forgotten with its subscription.
    created.insert((made.namespace.clone(), made.name.clone()), uid);
    let mut gone = lagging;
    gone.subscriptions.clear();
    prune_created(&mut created, &gone);
    assert!(created.is_empty());
}

/// No uid recorded (statuses written by an operator from before uids were recorded, a pass
/// that ended between publishing and writing statuses, a status lost): the Secret holding the
/// very secret the published configuration accepts for the subscription is the operator's, and
/// its uid is recorded. One holding anything else is not, nor, once a uid is recorded, a Secret
/// of another uid holding the served secret (a leaked secret's Secret deleted to rotate it and
/// planted again).
#[test]
fn without_a_record_the_secret_the_gateways_accept_is_recognised() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    let published = Known::served(Some(p1.compiled.config.clone()), Created::new());
    let mut before = apply(r, &p1);
    let uid = before.secrets[0].metadata.uid.clone();
    for s in &mut before.subscriptions {
        if let Some(st) = s.status.as_mut() {
            st.credentials_secret_uid = None;
        }
    }
    let p2 = plan(before.clone(), &published, &mut g, "t2");
    assert!(svc_client(&p2).is_some());
    assert_eq!(status_of(&p2, "svc-mobile").credentials_secret_uid, uid);
    assert_eq!(p2.statuses.len(), 1, "{:?}", p2.statuses);
    assert!(p2.new_secrets.is_empty());
    // Nothing published (or published without it): not recognised.
    let p = plan(before.clone(), &Known::default(), &mut g, "t3");
    assert!(svc_client(&p).is_none());
    assert_eq!(svc_verdict(&p).phase, Phase::Invalid);

    // A planted Secret holds another value: not recognised, whatever was published.
    let mut planted = before.clone();
    planted.secrets = vec![forged_secret()];
    let p = plan(planted.clone(), &published, &mut g, "t4");
    assert!(svc_client(&p).is_none());

    // The served value, but a uid is recorded and it is another one.
    let mut replanted = before.clone();
    replanted.secrets[0].metadata.uid = Some("uid-of-a-replanted-secret".into());
    for s in &mut replanted.subscriptions {
        if let Some(st) = s.status.as_mut() {
            st.credentials_secret_uid = uid.clone();
        }
    }
    let p = plan(replanted, &published, &mut g, "t5");
    assert!(svc_client(&p).is_none());
}

/// The published secret only vouches for a Secret an operator from before uids left named in
/// the status. Not for a planted Secret holding it where the status names none: a subscription
/// that used a clientSecretRef until now (its published secret is that Secret's, perhaps
/// leaked), or one deleted and created again under the same name (a new status).
#[test]
fn the_published_secret_vouches_only_for_a_secret_the_status_names() {
    let mut g = Seq(0);
    let served_value = "0123456789abcdef0123456789abcdef";
    let mut r = resources("");
    let mut planted = forged_secret();
    planted.data = Some(
        [(
            SECRET_KEY.to_string(),
            k8s_openapi::ByteString(served_value.as_bytes().to_vec()),
        )]
        .into(),
    );
    r.secrets.push(planted);
    let mut published = Known::default();
    published.served_secrets.insert(
        "demo/svc-mobile".into(),
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            served_value.as_bytes(),
        )),
    );
    for status in [
        // clientSecretRef until now: Active, no Secret named.
        Some(ResourceStatus {
            phase: Some("Active".into()),
            ..Default::default()
        }),
        // Created again: no status yet.
        None,
    ] {
        svc_mut(&mut r).status = status.clone();
        let p = plan(r.clone(), &published, &mut g, "t");
        assert!(svc_client(&p).is_none(), "{status:?}");
        assert_eq!(svc_verdict(&p).phase, Phase::Invalid);
        assert!(p.client_id_updates.is_empty());
    }
}

/// The recorded uid is never lost: not while its Secret is missing and its subscription waits
/// (no create), not while a clientSecretRef is used for a while, and the placeholder of a
/// Secret that is not created never reaches a status.
#[test]
fn the_recorded_uid_outlasts_an_absent_secret_and_a_client_secret_ref() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    let r2 = apply(r, &p1);
    let uid = svc_status(&r2).credentials_secret_uid.clone();
    assert!(uid.is_some());

    // A clientSecretRef for a while: the generated Secret is not read, the record stays.
    let mut with_ref = r2.clone();
    with_ref.secrets.clear();
    let mut own = Secret::default();
    own.metadata.name = Some("own".into());
    own.metadata.namespace = Some("demo".into());
    own.metadata.labels = Some(
        [(
            gatehouse_crds::compile::CLIENT_SECRET_LABEL.to_string(),
            "true".to_string(),
        )]
        .into(),
    );
    own.data = Some(
        [(
            SECRET_KEY.to_string(),
            k8s_openapi::ByteString(b"0123456789abcdef0123456789abcdef".to_vec()),
        )]
        .into(),
    );
    with_ref.secrets.push(own);
    let s = svc_mut(&mut with_ref);
    s.spec.client_secret_ref = Some(gatehouse_crds::SecretKeyRef {
        name: "own".into(),
        key: "clientSecret".into(),
    });
    let p = plan(with_ref.clone(), &Known::default(), &mut g, "t2");
    assert_eq!(svc_verdict(&p).phase, Phase::Active);
    let r3 = apply(with_ref, &p);
    assert_eq!(svc_status(&r3).credentials_secret_uid, uid);
    // The ref removed: the operator's Secret is its own again.
    let mut without = r3;
    without.secrets = r2.secrets.clone();
    for s in &mut without.subscriptions {
        s.spec.client_secret_ref = None;
    }
    let p = plan(without, &Known::default(), &mut g, "t3");
    assert_eq!(svc_verdict(&p).phase, Phase::Active);
    assert!(svc_client(&p).is_some());

    // The Secret gone while the subscription waits for approval: nothing is created, the
    // record stays, and no placeholder is written.
    let mut waiting = r2.clone();
    waiting.secrets.clear();
    svc_mut(&mut waiting).spec.plan = "gold".into();
    let p = plan(waiting, &Known::default(), &mut g, "t4");
    assert!(p.new_secrets.is_empty());
    let st = status_of(&p, "svc-mobile");
    assert_eq!(st.phase.as_deref(), Some("PendingApproval"));
    assert_eq!(st.credentials_secret_uid, uid);
    for u in &p.statuses {
        assert_ne!(
            u.status.credentials_secret_uid.as_deref(),
            Some(UID_BEING_CREATED)
        );
    }
}

/// A create refused (a quota, or the operator's own Secret not seen yet): the status says why
/// and keeps the record, so the Secret is the subscription's once seen.
#[test]
fn a_refused_create_keeps_the_record() {
    let mut g = Seq(0);
    let r = resources("");
    let p1 = plan(r.clone(), &Known::default(), &mut g, "t1");
    let mut r2 = apply(r, &p1);
    let uid = svc_status(&r2).credentials_secret_uid.clone();
    let secret = r2.secrets.remove(0);
    let p2 = plan(r2.clone(), &Known::default(), &mut g, "t2");
    assert_eq!(p2.new_secrets.len(), 1);
    let failed = credentials_failed(&r2, None, "demo", "svc-mobile", "AlreadyExists (409)", "t2")
        .expect("a status update");
    assert_eq!(failed.status.credentials_secret_uid, uid);
    assert_eq!(
        failed.status.conditions[0].reason,
        CREDENTIALS_SECRET_FAILED
    );
    // Seen on the next pass: Active again, nothing to create.
    let mut r3 = r2;
    svc_mut(&mut r3).status = Some(failed.status.clone());
    r3.secrets.push(secret);
    let p3 = plan(r3, &Known::default(), &mut g, "t3");
    assert!(p3.new_secrets.is_empty());
    assert_eq!(svc_verdict(&p3).phase, Phase::Active);
}
