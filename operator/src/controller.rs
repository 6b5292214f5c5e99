//! The operator's Kubernetes I/O: reflectors over the four kinds and Secrets' metadata, one
//! debounced reconcile of everything after any change (the configuration is compiled as a whole:
//! prefix and client-id conflicts span resources), reads of the Secrets subscriptions name,
//! status patches, Secret creation, publishing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use gatehouse_crds::publish::{self, CONFIG_KEY, HASH_ANNOTATION};
use gatehouse_crds::{Api as GhApi, Application, Kind, Plan as GhPlan, Resources, Subscription};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube_client::api::{
    Api, DeleteParams, PartialObjectMeta, Patch, PatchParams, PostParams, Preconditions,
};
use kube_client::runtime::reflector::{self, Store};
use kube_client::runtime::watcher;
use kube_client::{Client, Resource, ResourceExt};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Notify;

use crate::reconcile::{self, Generator, NewSecret, StatusUpdate};

#[derive(Clone, Debug)]
pub struct Options {
    /// Namespaces to watch; empty = all.
    pub namespaces: Vec<String>,
    /// Where to publish: namespace and ConfigMap name.
    pub config_map_namespace: String,
    pub config_map_name: String,
}

pub const FIELD_MANAGER: &str = "gatehouse-operator";

/// One Api per watched namespace, or one for all of them.
fn apis_of<K>(client: &Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    }
}

/// Runs a reflector's stream: every event triggers a pass; errors are retried after 1 s.
fn drive<S, T, E>(stream: S, trigger: Arc<Notify>, kind: String)
where
    S: futures_util::Stream<Item = Result<T, E>> + Send + 'static,
    T: Send,
    E: std::fmt::Display + Send,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => trigger.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, kind = %kind, "watch error (retrying)");
                    metrics::counter!("gatehouse_operator_watch_errors_total").increment(1);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

impl Watched<PartialObjectMeta<Secret>> {
    /// Secrets' metadata (kube asks the API server for PartialObjectMetadata: no data on the
    /// wire), kept without annotations and managedFields: kubectl's last-applied-configuration
    /// annotation holds a whole Secret, data included.
    fn start_metadata(
        client: &Client,
        namespaces: &[String],
        trigger: Arc<Notify>,
        config: watcher::Config,
    ) -> Self {
        use kube_client::runtime::WatchStreamExt;
        let mut stores = Vec::new();
        for api in apis_of::<PartialObjectMeta<Secret>>(client, namespaces) {
            let (reader, writer) = reflector::store::<PartialObjectMeta<Secret>>();
            let stream = watcher(api, config.clone()).modify(strip_secret_metadata);
            drive(
                reflector::reflector(writer, stream),
                trigger.clone(),
                "Secret".to_string(),
            );
            stores.push(reader);
        }
        Watched { stores }
    }
}

/// What the operator keeps of a Secret it watches: name, namespace, resourceVersion, labels,
/// owners; not annotations or managedFields, where copies of the data can live.
fn strip_secret_metadata(m: &mut PartialObjectMeta<Secret>) {
    m.metadata.annotations = None;
    m.metadata.managed_fields = None;
}

/// Why a credentials Secret could not be created, as a tenant's status may say it: the API
/// server's reason and code, not its message (which names the operator's service account, its
/// namespace, a policy's wording); the whole answer is in the operator's log.
fn refusal_for_status(e: &anyhow::Error) -> String {
    match e.downcast_ref::<kube_client::Error>() {
        Some(kube_client::Error::Api(refused)) => format!(
            "the API server refused it ({}, HTTP {}); the operator's log has its answer",
            refused.reason, refused.code
        ),
        Some(_) => "the API server could not be asked; the operator's log says why".to_string(),
        // The operator's own explanation (a Secret of that name that is not this one's).
        None => format!("{e:#}"),
    }
}

/// Watches of one kind across the configured namespaces.
struct Watched<K: Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    stores: Vec<Store<K>>,
}

impl<K> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Default,
{
    fn start(
        client: &Client,
        namespaces: &[String],
        trigger: Arc<Notify>,
        config: watcher::Config,
    ) -> Watched<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    {
        let mut stores = Vec::new();
        for api in apis_of::<K>(client, namespaces) {
            let (reader, writer) = reflector::store::<K>();
            let stream = reflector::reflector(writer, watcher(api, config.clone()));
            drive(
                stream,
                trigger.clone(),
                K::kind(&Default::default()).to_string(),
            );
            stores.push(reader);
        }
        Watched { stores }
    }

    async fn ready(&self) {
        for s in &self.stores {
            let _ = s.wait_until_ready().await;
        }
    }

    fn items(&self) -> Vec<K> {
        self.stores
            .iter()
            .flat_map(|s| s.state())
            .map(|o| (*o).clone())
            .collect()
    }
}

struct OsRandom;

impl Generator for OsRandom {
    fn secret(&mut self) -> String {
        let mut b = [0u8; 32];
        rand::rng().fill_bytes(&mut b);
        hex::encode(b)
    }
}

pub struct Controller {
    client: Client,
    opts: Options,
    apis: Watched<GhApi>,
    plans: Watched<GhPlan>,
    applications: Watched<Application>,
    subscriptions: Watched<Subscription>,
    /// Metadata only: the data of Secrets no subscription names never enters the operator.
    secrets: Watched<PartialObjectMeta<Secret>>,
    /// The Secrets subscriptions name, as last read, by namespace and name.
    secret_data: tokio::sync::Mutex<HashMap<(String, String), Secret>>,
    /// Credentials Secrets this process created whose uids the statuses read back do not show
    /// yet.
    created: std::sync::Mutex<reconcile::Created>,
    /// Statuses this process wrote: (kind, namespace, name) -> the resourceVersions the write
    /// superseded. A pass whose view still shows one of those has not seen the write yet: its
    /// status write would only fail as decided on an older version, so it is not sent (the
    /// write's own watch event runs the pass that decides from the newer one).
    written: std::sync::Mutex<HashMap<(Kind, String, String), Vec<String>>>,
    trigger: Arc<Notify>,
    pub synced: Arc<AtomicBool>,
}

impl Controller {
    pub fn new(client: Client, opts: Options) -> Controller {
        let trigger = Arc::new(Notify::new());
        let ns = opts.namespaces.clone();
        Controller {
            apis: Watched::start(&client, &ns, trigger.clone(), Default::default()),
            plans: Watched::start(&client, &ns, trigger.clone(), Default::default()),
            applications: Watched::start(&client, &ns, trigger.clone(), Default::default()),
            subscriptions: Watched::start(&client, &ns, trigger.clone(), Default::default()),
            // Client secrets are Opaque (the default type): service-account tokens, TLS keys,
            // Helm release records and the like are neither read into memory nor reconciled on.
            secrets: Watched::start_metadata(
                &client,
                &ns,
                trigger.clone(),
                watcher::Config::default().fields("type=Opaque"),
            ),
            secret_data: Default::default(),
            created: Default::default(),
            written: Default::default(),
            client,
            opts,
            trigger,
            synced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Reconciles after every change (debounced) and at least every five minutes, forever.
    pub async fn run(&self, is_leader: Arc<AtomicBool>) {
        self.apis.ready().await;
        self.plans.ready().await;
        self.applications.ready().await;
        self.subscriptions.ready().await;
        self.secrets.ready().await;
        tracing::info!("caches synced");
        loop {
            if is_leader.load(Ordering::SeqCst) {
                match self.reconcile_once().await {
                    Ok(()) => self.synced.store(true, Ordering::SeqCst),
                    Err(e) => {
                        tracing::error!(error = %e, "reconcile failed; retrying");
                        metrics::counter!("gatehouse_operator_reconcile_errors_total").increment(1);
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        continue;
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(300), self.trigger.notified()).await;
            // Let a burst of events (kubectl apply -f dir/) settle into one pass.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asks for a reconcile now (e.g. after winning the lease).
    pub fn kick(&self) {
        self.trigger.notify_one();
    }

    /// Asks for a reconcile in `secs` seconds (a step that failed and may succeed later).
    fn kick_later(&self, secs: u64) {
        let trigger = self.trigger.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            trigger.notify_one();
        });
    }

    async fn snapshot(&self) -> anyhow::Result<Resources> {
        let subscriptions = self.subscriptions.items();
        Ok(Resources {
            secrets: self.named_secrets(&subscriptions).await?,
            apis: self.apis.items(),
            plans: self.plans.items(),
            applications: self.applications.items(),
            subscriptions,
        })
    }

    /// The Secrets that subscriptions name (their `clientSecretRef`, or the one the operator
    /// generates), read when the watch shows a version not read yet. A read that fails keeps
    /// the copy read before (as a lagging watch would) and is retried; with no copy the pass
    /// fails, since leaving the Secret out would drop a working client from the gateways.
    async fn named_secrets(&self, subscriptions: &[Subscription]) -> anyhow::Result<Vec<Secret>> {
        let mut wanted = BTreeSet::new();
        // Generated Secrets known to exist (a status records one, or this process created it):
        // read directly when the watch has not shown them yet, rather than taken for deleted
        // (the operator would try to create them again and fail).
        let mut expected: BTreeSet<(String, String)> = self
            .created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for sub in subscriptions {
            let namespace = sub
                .namespace()
                .unwrap_or_else(|| gatehouse_crds::compile::DEFAULT_NAMESPACE.to_string());
            match &sub.spec.client_secret_ref {
                Some(r) => {
                    wanted.insert((namespace, r.name.clone()));
                }
                None => {
                    let generated = gatehouse_crds::compile::generated_secret_name(&sub.name_any());
                    if let Some(named) = sub
                        .status
                        .as_ref()
                        .and_then(|s| s.credentials_secret.clone())
                    {
                        wanted.insert((namespace.clone(), named));
                    }
                    if sub
                        .status
                        .as_ref()
                        .is_some_and(|s| s.credentials_secret_uid.is_some())
                    {
                        expected.insert((namespace.clone(), generated.clone()));
                    }
                    wanted.insert((namespace, generated));
                }
            }
        }
        let mut cache = self.secret_data.lock().await;
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for meta in self.secrets.items() {
            let key = (meta.namespace().unwrap_or_default(), meta.name_any());
            // Neither labelled for clientSecretRef nor a subscription's generated credentials:
            // compile could not use it, so its data is never read (and a copy read while it was
            // labelled is dropped below).
            if !wanted.contains(&key)
                || !gatehouse_crds::compile::may_hold_client_secret(&meta.metadata)
            {
                continue;
            }
            seen.insert(key.clone());
            let current = cache
                .get(&key)
                .filter(|s| s.resource_version() == meta.resource_version());
            if let Some(secret) = current {
                out.push(secret.clone());
                continue;
            }
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &key.0);
            match api.get_opt(&key.1).await {
                Ok(Some(secret)) => {
                    cache.insert(key, secret.clone());
                    out.push(secret);
                }
                // Deleted since the watch saw it; the next watch event reconciles again.
                Ok(None) => {
                    cache.remove(&key);
                }
                Err(e) => match cache.get(&key) {
                    Some(older) => {
                        tracing::warn!(secret = %format!("{}/{}", key.0, key.1), error = %e, "cannot read a changed client Secret; using the version read before");
                        self.kick_later(10);
                        out.push(older.clone());
                    }
                    None => {
                        return Err(anyhow::anyhow!("reading Secret {}/{}: {e}", key.0, key.1));
                    }
                },
            }
        }
        for key in expected {
            if seen.contains(&key) || !wanted.contains(&key) {
                continue;
            }
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &key.0);
            // Its metadata first, like the watch: the data only of a Secret compile could use.
            let read = match api.get_metadata_opt(&key.1).await {
                Ok(Some(meta))
                    if gatehouse_crds::compile::may_hold_client_secret(&meta.metadata) =>
                {
                    api.get_opt(&key.1).await
                }
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
            match read {
                Ok(Some(secret)) if secret.type_.as_deref().unwrap_or("Opaque") == "Opaque" => {
                    seen.insert(key.clone());
                    cache.insert(key, secret.clone());
                    out.push(secret);
                }
                Ok(_) => {}
                Err(e) => match cache.get(&key) {
                    Some(older) => {
                        tracing::warn!(secret = %format!("{}/{}", key.0, key.1), error = %e, "cannot read a client Secret the watch has not shown; using the version read before");
                        self.kick_later(10);
                        seen.insert(key.clone());
                        out.push(older.clone());
                    }
                    // Left out, the subscription's working client would be dropped from the
                    // gateways: the pass fails instead and is retried.
                    None => {
                        return Err(anyhow::anyhow!("reading Secret {}/{}: {e}", key.0, key.1));
                    }
                },
            }
        }
        // Secrets no longer named, or gone, leave memory too.
        cache.retain(|key, _| seen.contains(key));
        Ok(out)
    }

    async fn reconcile_once(&self) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let res = self.snapshot().await?;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let created = {
            let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
            reconcile::prune_created(&mut created, &res);
            created.clone()
        };
        // Prefixes stay with the Apis the gateways serve them for (`compile_after`); the served
        // secrets' hashes recognise the operator's own credentials Secrets.
        let known =
            reconcile::Known::served(served_config(self.published().await?.as_ref()), created);
        let mut plan = reconcile::plan(res.clone(), &known, &mut OsRandom, &now);
        // A Secret that cannot be created (a name too long, a quota, a policy, a namespace being
        // deleted) keeps its subscription out of this pass, never the whole configuration: the
        // others' changes (revocations among them) still reach the gateways.
        // Failed subscription ("namespace/name") -> (namespace, name, error).
        let mut failed: BTreeMap<String, (String, String, String)> = Default::default();
        // Subscriptions whose new Secret was recorded: the version this pass read, which the
        // final status write supersedes too.
        let mut recorded_over: HashMap<(String, String), String> = HashMap::new();
        // Subscriptions whose Secret waits for a pass from a newer view ("namespace/name").
        let mut stale: BTreeSet<String> = BTreeSet::new();
        for s in &plan.new_secrets {
            let viewed = res
                .subscriptions
                .iter()
                .find(|o| {
                    o.namespace().as_deref() == Some(&s.namespace) && o.name_any() == s.subscription
                })
                .and_then(|o| o.metadata.resource_version.clone());
            match self.create_and_record(s, viewed.clone()).await {
                Ok(None) => {
                    stale.insert(format!("{}/{}", s.namespace, s.subscription));
                }
                Ok(Some((uid, rv))) => {
                    if let Some(viewed) = viewed {
                        recorded_over.insert((s.namespace.clone(), s.subscription.clone()), viewed);
                    }
                    self.created
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((s.namespace.clone(), s.name.clone()), uid.clone());
                    reconcile::record_created(&mut plan.statuses, s, &uid);
                    for u in plan.statuses.iter_mut().filter(|u| {
                        u.kind == Kind::Subscription
                            && u.namespace == s.namespace
                            && u.name == s.subscription
                    }) {
                        u.resource_version = rv.clone();
                    }
                }
                Err(e) => {
                    let sub = format!("{}/{}", s.namespace, s.subscription);
                    tracing::error!(subscription = %sub, secret = %s.name, error = %e, "cannot create client credentials; subscription left out until it can");
                    metrics::counter!("gatehouse_operator_errors_total", "kind" => Kind::Subscription.as_str()).increment(1);
                    failed.insert(
                        sub,
                        (
                            s.namespace.clone(),
                            s.subscription.clone(),
                            refusal_for_status(&e),
                        ),
                    );
                }
            }
        }
        for u in &plan.client_id_updates {
            // The gateways accept the new id either way; a client reading the Secret gets the
            // old one until this succeeds (retried on the next pass, which finds it again).
            if let Err(e) = self.update_client_id(u).await {
                tracing::error!(secret = %format!("{}/{}", u.namespace, u.name), error = %e, "cannot update the clientId in client credentials");
                metrics::counter!("gatehouse_operator_errors_total", "kind" => Kind::Subscription.as_str()).increment(1);
                self.kick_later(10);
            }
        }
        if !stale.is_empty() {
            // Out of this pass altogether (its Secret was deleted again): not published, no
            // status; the next pass decides from a newer view.
            reconcile::leave_out(&mut plan.compiled, |sub| stale.contains(sub));
            plan.statuses.retain(|u| {
                u.kind != Kind::Subscription
                    || !stale.contains(&format!("{}/{}", u.namespace, u.name))
            });
            self.kick_later(1);
        }
        if !failed.is_empty() {
            reconcile::leave_out(&mut plan.compiled, |sub| failed.contains_key(sub));
            // Their status says why they are out, instead of what compile expected.
            let (planned, mut statuses): (Vec<StatusUpdate>, Vec<StatusUpdate>) =
                std::mem::take(&mut plan.statuses)
                    .into_iter()
                    .partition(|u| {
                        u.kind == Kind::Subscription
                            && failed.contains_key(&format!("{}/{}", u.namespace, u.name))
                    });
            for (namespace, name, error) in failed.values() {
                let planned = planned
                    .iter()
                    .find(|u| &u.namespace == namespace && &u.name == name);
                statuses.extend(reconcile::credentials_failed(
                    &res, planned, namespace, name, error, &now,
                ));
            }
            plan.statuses = statuses;
            self.kick_later(10);
        }
        // Published before any status says Ready: a resource reads Ready only once the
        // gateways can be serving it. A failed publish still writes every status, with the
        // resources it would have served Ready=False (they are not in the gateways'
        // configuration), and the pass fails so it is retried.
        let published = self.publish(&plan.compiled.config).await;
        if published.is_err() {
            // The error itself (the operator's account, its namespace, a policy's wording) is
            // logged by the caller, not copied into every tenant's status.
            plan.statuses = std::mem::take(&mut plan.statuses)
                .into_iter()
                .filter_map(|u| {
                    if reconcile::says_ready(&u) {
                        reconcile::publish_failed(&res, u, &now)
                    } else {
                        Some(u)
                    }
                })
                .collect();
        }
        // Kept only while the view still shows a version a write of this process superseded.
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(kind, namespace, name), superseded| {
                reconcile::viewed_version(&res, *kind, namespace, name)
                    .is_some_and(|rv| superseded.contains(&rv))
            });
        for u in &plan.statuses {
            let key = (u.kind, u.namespace.clone(), u.name.clone());
            let behind = self
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&key);
            if behind {
                continue;
            }
            let result = self.patch_status(u).await;
            if result.is_ok() {
                let mut superseded: Vec<String> = u.resource_version.iter().cloned().collect();
                superseded.extend(
                    recorded_over
                        .get(&(u.namespace.clone(), u.name.clone()))
                        .filter(|_| u.kind == Kind::Subscription)
                        .cloned(),
                );
                self.written
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, superseded);
            }
            if let Err(e) = result {
                if matches!(&e, kube_client::Error::Api(a) if a.code == 409) {
                    // Changed since this pass read it: the watch event of that change runs
                    // another pass, which decides from the newer version.
                    tracing::debug!(kind = %u.kind, resource = %format!("{}/{}", u.namespace, u.name), "status not written: the resource changed since this pass read it");
                    metrics::counter!("gatehouse_operator_status_conflicts_total", "kind" => u.kind.as_str()).increment(1);
                    self.kick_later(2);
                    continue;
                }
                // One resource failing to update never blocks the others.
                tracing::warn!(kind = %u.kind, resource = %format!("{}/{}", u.namespace, u.name), error = %e, "status update failed");
                metrics::counter!("gatehouse_operator_errors_total", "kind" => u.kind.as_str())
                    .increment(1);
            } else {
                metrics::counter!("gatehouse_operator_status_updates_total", "kind" => u.kind.as_str()).increment(1);
            }
        }
        for v in plan.compiled.problems() {
            tracing::debug!(kind = %v.kind, resource = %format!("{}/{}", v.namespace, v.name), reason = %v.reason, "{}", v.message);
        }
        for kind in [Kind::Api, Kind::Plan, Kind::Application, Kind::Subscription] {
            metrics::counter!("gatehouse_operator_reconciles_total", "kind" => kind.as_str())
                .increment(1);
        }
        published?;
        metrics::histogram!("gatehouse_operator_reconcile_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Creates a credentials Secret; its uid, which the subscription's status records.
    async fn create_secret(&self, s: &NewSecret) -> anyhow::Result<String> {
        let secret = reconcile::secret_object(s);
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &s.namespace);
        match api.create(&PostParams::default(), &secret).await {
            Ok(created) => {
                // Never log the secret itself.
                tracing::info!(secret = %format!("{}/{}", s.namespace, s.name), "created client credentials");
                created
                    .metadata
                    .uid
                    .filter(|u| !u.is_empty())
                    .ok_or_else(|| {
                        anyhow::anyhow!("the API server returned the Secret without a uid")
                    })
            }
            // A Secret of that name exists but is not in this pass's view: not yet seen by the
            // watch, or not of type Opaque (the watch's selector). The configuration was
            // compiled with the secret just generated, which nobody holds: the subscription
            // waits for the next pass instead (a wrong hash published on every pass before).
            Err(kube_client::Error::Api(e)) if e.code == 409 => Err(anyhow::anyhow!(
                "a Secret {}/{} exists that is not this subscription's (not of type Opaque, not owned by it, or not seen by the operator yet): delete it, or, if it is yours, label it {}=true and name it in spec.clientSecretRef",
                s.namespace,
                s.name,
                gatehouse_crds::compile::CLIENT_SECRET_LABEL
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a credentials Secret and records its uid in the subscription's status at once,
    /// before anything is published: a pass that ends in between (a crash, a restart) leaves
    /// nothing unrecorded. The record is written at the version this pass read (`viewed`),
    /// which also rules out a Subscription created again under the name: a pass from an older
    /// view (a stalled former leader, a lagging watch) must not record its Secret over a newer
    /// record. A Secret that cannot be recorded would be nobody's: it is deleted again (that
    /// object only). The Secret's uid and the subscription's new resourceVersion; None when
    /// the view was older than the Subscription (the next pass, from a newer view, retries).
    async fn create_and_record(
        &self,
        s: &NewSecret,
        viewed: Option<String>,
    ) -> anyhow::Result<Option<(String, Option<String>)>> {
        let uid = self.create_secret(s).await?;
        let recorded = self.record_uid(s, &uid, viewed).await;
        let stale = matches!(&recorded, Err(kube_client::Error::Api(a)) if a.code == 409);
        let e = match recorded {
            Ok(rv) => return Ok(Some((uid, rv))),
            Err(e) => e,
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &s.namespace);
        let only_it = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&s.name, &only_it).await {
            Ok(_) => {}
            Err(kube_client::Error::Api(a)) if a.code == 404 => {}
            Err(d) => {
                // Left in place: this process still knows it for its own.
                tracing::warn!(secret = %format!("{}/{}", s.namespace, s.name), error = %d, "cannot delete a credentials Secret whose record failed");
                self.created
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((s.namespace.clone(), s.name.clone()), uid);
            }
        }
        if stale {
            tracing::debug!(subscription = %format!("{}/{}", s.namespace, s.subscription), "the subscription changed since this pass read it; its credentials wait for the next pass");
            return Ok(None);
        }
        Err(anyhow::Error::from(e)
            .context("recording the new credentials Secret in the subscription's status"))
    }

    /// Records a credentials Secret just created in its subscription's status; the
    /// subscription's new resourceVersion.
    async fn record_uid(
        &self,
        s: &NewSecret,
        uid: &str,
        viewed: Option<String>,
    ) -> Result<Option<String>, kube_client::Error> {
        let mut patch = serde_json::json!({ "status": {
            "credentialsSecret": s.name,
            "credentialsSecretUid": uid,
        }});
        if let Some(rv) = viewed {
            patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        let written = Api::<Subscription>::namespaced(self.client.clone(), &s.namespace)
            .patch_status(
                &s.subscription,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        Ok(written.metadata.resource_version)
    }

    async fn update_client_id(&self, u: &reconcile::ClientIdUpdate) -> anyhow::Result<()> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &u.namespace);
        // Only into the recorded Secret: on any other object the uid fails the write (422).
        let patch = serde_json::json!({
            "metadata": { "uid": u.uid },
            "stringData": { reconcile::CLIENT_ID_KEY: u.client_id },
        });
        api.patch(&u.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(secret = %format!("{}/{}", u.namespace, u.name), client_id = %u.client_id, "updated the clientId in client credentials");
        Ok(())
    }

    async fn patch_status(&self, u: &StatusUpdate) -> Result<(), kube_client::Error> {
        let patch = Patch::Merge(reconcile::status_patch(
            &u.status,
            u.resource_version.as_deref(),
        ));
        let pp = PatchParams::default();
        let c = self.client.clone();
        match u.kind {
            Kind::Api => Api::<GhApi>::namespaced(c, &u.namespace)
                .patch_status(&u.name, &pp, &patch)
                .await
                .map(|_| ()),
            Kind::Plan => Api::<GhPlan>::namespaced(c, &u.namespace)
                .patch_status(&u.name, &pp, &patch)
                .await
                .map(|_| ()),
            Kind::Application => Api::<Application>::namespaced(c, &u.namespace)
                .patch_status(&u.name, &pp, &patch)
                .await
                .map(|_| ()),
            Kind::Subscription => {
                let written = Api::<Subscription>::namespaced(c, &u.namespace)
                    .patch_status(&u.name, &pp, &patch)
                    .await?;
                let kept = written.status.and_then(|s| s.credentials_secret_uid);
                if u.status.credentials_secret_uid.is_some() && kept.is_none() {
                    // A structural schema prunes fields it does not know: without the record,
                    // each pass adopts the operator's Secrets again by their served hash.
                    tracing::warn!(subscription = %format!("{}/{}", u.namespace, u.name), "the API server dropped status.credentialsSecretUid: the Subscription CRD is older than this operator; apply it (kubectl apply --server-side -f charts/gatehouse/crds/)");
                }
                Ok(())
            }
        }
    }

    /// The ConfigMap the gateways read, as published last (by this or an earlier leader).
    async fn published(&self) -> anyhow::Result<Option<ConfigMap>> {
        let api: Api<ConfigMap> =
            Api::namespaced(self.client.clone(), &self.opts.config_map_namespace);
        Ok(api.get_opt(&self.opts.config_map_name).await?)
    }

    /// Writes the ConfigMap only when the configuration's hash changed. Read again here, not at
    /// the start of the pass: one deleted meanwhile is written again.
    async fn publish(&self, config: &gatehouse_crds::GatewayConfig) -> anyhow::Result<()> {
        let api: Api<ConfigMap> =
            Api::namespaced(self.client.clone(), &self.opts.config_map_namespace);
        let current = self.published().await?;
        let published_hash = current
            .as_ref()
            .and_then(|cm| cm.annotations().get(HASH_ANNOTATION).cloned());
        if published_hash.as_deref() == Some(config.hash.as_str()) {
            return Ok(());
        }
        let bytes = publish::encode(config)?;
        metrics::gauge!("gatehouse_operator_config_bytes").set(bytes.len() as f64);
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(self.opts.config_map_name.clone());
        cm.metadata.annotations = Some(BTreeMap::from([(
            HASH_ANNOTATION.to_string(),
            config.hash.clone(),
        )]));
        cm.metadata.labels = Some(BTreeMap::from([(
            reconcile::MANAGED_LABEL.to_string(),
            reconcile::MANAGED_VALUE.to_string(),
        )]));
        cm.binary_data = Some(BTreeMap::from([(
            CONFIG_KEY.to_string(),
            ByteString(bytes),
        )]));
        let mut value = serde_json::to_value(&cm)?;
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("ConfigMap");
        api.patch(
            &self.opts.config_map_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(value),
        )
        .await?;
        metrics::counter!("gatehouse_operator_publishes_total").increment(1);
        tracing::info!(
            hash = %&config.hash[..12],
            apis = config.apis.len(),
            clients = config.clients.len(),
            configmap = %format!("{}/{}", self.opts.config_map_namespace, self.opts.config_map_name),
            "published gateway configuration"
        );
        Ok(())
    }
}

/// The Apis of a published configuration; none when there is none or it cannot be read (then
/// conflicts go by age, as on a first start).
fn served_config(cm: Option<&ConfigMap>) -> Option<gatehouse_crds::GatewayConfig> {
    let bytes = cm.and_then(|cm| cm.binary_data.as_ref()?.get(CONFIG_KEY))?;
    match publish::decode(&bytes.0) {
        Ok(config) => Some(config),
        Err(e) => {
            tracing::warn!(error = %e, "the published configuration cannot be read; path prefix conflicts go by age");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kubectl apply` leaves the whole Secret, data included, in an annotation.
    #[test]
    fn watched_secret_metadata_keeps_no_copy_of_the_data() {
        let mut m: PartialObjectMeta<Secret> = serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": {
                "name": "s", "namespace": "demo", "resourceVersion": "7",
                "labels": {"a": "b"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration":
                    "{\"data\":{\"clientSecret\":\"c2VjcmV0\"}}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            }
        }))
        .unwrap();
        strip_secret_metadata(&mut m);
        let kept = serde_json::to_string(&m).unwrap();
        assert!(
            !kept.contains("c2VjcmV0") && !kept.contains("kubectl"),
            "{kept}"
        );
        assert_eq!(m.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(m.labels().get("a").map(String::as_str), Some("b"));
    }
}
