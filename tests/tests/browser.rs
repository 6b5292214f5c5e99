//! A real browser on the real pages: headless Chromium, driven through chromedriver (WebDriver,
//! the `fantoccini` crate), clicks through sign-in, sign-up and consent of the real
//! `gatehouse-gateway` binary and ends at the app's redirect with a code, which the test then
//! exchanges (PKCE) and uses on the API.
//!
//! Needs the Debian packages `chromium` and `chromium-driver` (scripts/test.sh installs them);
//! when either is missing the test fails and says so: it never skips and never downloads a
//! browser. `CHROMIUM` and `CHROMEDRIVER` override the paths.
//!
//! Screenshots of every page go to `target/browser-artifacts/` (with chromedriver's log).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt as _;
use gatehouse_tests::procs::{Gateway, free_port, http_status};
use serde_json::{Value, json};
use url::Url;

const EMAIL: &str = "browser-user@example.com";
const PASSWORD: &str = "purple monkey dishwasher sunrise";
const CLIENT_ID: &str = "browser-app-mobile";
const APP_NAME: &str = "Browser Test App";
const CUSTOM_REDIRECT: &str = "myapp://callback";
/// How long any one page may take to appear (two shared cores, a cold Chromium).
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

fn manifests(upstream: &str) -> String {
    format!(
        r#"apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: basic, namespace: browser}}
spec:
  rateLimits: [{{requests: 100, per: second}}]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: mobile, namespace: browser}}
spec:
  displayName: Mobile API
  pathPrefix: /mobile
  upstream: {{url: "{upstream}"}}
  plans: [basic]
  auth:
    grants: [authorization_code, refresh_token]
    scopes:
      - {{name: profile, description: Read your profile}}
      - {{name: orders, description: See and place your orders}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: browser-app, namespace: browser}}
spec:
  displayName: {APP_NAME}
  clientType: public
  redirectUris:
    - http://127.0.0.1/callback   # loopback: any port (RFC 8252 7.3)
    - {CUSTOM_REDIRECT}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: browser-app-mobile, namespace: browser}}
spec:
  application: browser-app
  api: mobile
  plan: basic
  trusted: false
  clientId: {CLIENT_ID}
"#
    )
}

/// `target/browser-artifacts`, from `target/<profile>/deps/<this test>`.
fn artifacts_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let dir = target.join("browser-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/browser-artifacts");
    // No stale pictures from an earlier run.
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "png") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    dir
}

/// A program the test needs: `$env_var` if set, else `name` on PATH, else `/usr/bin/<name>`; a
/// missing one fails the test with the way to install it.
fn require_program(name: &str, env_var: &str) -> PathBuf {
    const HOW: &str = "Run scripts/test.sh, which installs the test dependencies, or: \
                       apt-get install chromium chromium-driver";
    if let Some(p) = std::env::var_os(env_var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
    {
        assert!(
            p.is_file(),
            "the browser test needs `{name}`: {env_var}={} is not a file. {HOW}",
            p.display()
        );
        return p;
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| Some(Path::new("/usr/bin").join(name)).filter(|p| p.is_file()))
        .unwrap_or_else(|| panic!("the browser test needs `{name}` and it is not installed. {HOW}"))
}

/// chromedriver on a free loopback port; killed on drop.
struct Chromedriver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Chromedriver {
    fn start(bin: &Path, log: PathBuf) -> Chromedriver {
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}/"),
            log,
        };
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = driver.child.try_wait() {
                panic!("chromedriver exited with {status}:\n{}", driver.logs());
            }
            if http_status(addr, "/status") == Some(200) {
                return driver;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within 30 s:\n{}",
                driver.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of chromedriver's log (it is verbose).
    fn logs(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(8000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(0);
        log[start..].to_string()
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A chromedriver-specific endpoint under `/session/<id>/`, e.g. `goog/cdp/execute` or `se/log`.
#[derive(Debug)]
struct SessionPost {
    path: &'static str,
    body: Value,
}

impl WebDriverCompatibleCommand for SessionPost {
    fn endpoint(&self, base: &Url, session: Option<&str>) -> Result<Url, url::ParseError> {
        base.join(&format!(
            "session/{}/{}",
            session.unwrap_or_default(),
            self.path
        ))
    }

    fn method_and_body(&self, _: &Url) -> (hyper::Method, Option<String>) {
        (hyper::Method::POST, Some(self.body.to_string()))
    }
}

/// Runs a Chrome DevTools Protocol command through chromedriver.
async fn cdp(client: &Client, cmd: &str, params: Value) -> Result<Value> {
    client
        .issue_cmd(SessionPost {
            path: "goog/cdp/execute",
            body: json!({"cmd": cmd, "params": params}),
        })
        .await
        .with_context(|| format!("CDP {cmd}"))
}

/// The browser's network events since the last call (chromedriver's performance log).
async fn network_events(client: &Client) -> Result<Vec<Value>> {
    let entries = client
        .issue_cmd(SessionPost {
            path: "se/log",
            body: json!({"type": "performance"}),
        })
        .await
        .context("reading the performance log")?;
    Ok(entries
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["message"].as_str())
        .filter_map(|m| serde_json::from_str::<Value>(m).ok())
        .map(|m| m["message"].clone())
        .filter(|m| {
            m["method"]
                .as_str()
                .is_some_and(|n| n.starts_with("Network."))
        })
        .collect())
}

struct Shots {
    dir: PathBuf,
}

impl Shots {
    async fn take(&self, client: &Client, name: &str) -> Result<PathBuf> {
        let png = client.screenshot().await.context("screenshot")?;
        ensure!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let path = self.dir.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Polls the current URL until `pred` holds.
async fn wait_for_url(client: &Client, what: &str, pred: impl Fn(&Url) -> bool) -> Result<Url> {
    let deadline = Instant::now() + PAGE_TIMEOUT;
    loop {
        let url = client.current_url().await?;
        if pred(&url) {
            return Ok(url);
        }
        if Instant::now() > deadline {
            bail!("waited {PAGE_TIMEOUT:?} for {what}; the browser is at {url}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn heading(client: &Client) -> Result<String> {
    Ok(client
        .wait()
        .at_most(PAGE_TIMEOUT)
        .for_element(Locator::Css("h1"))
        .await
        .context("page has no <h1>")?
        .text()
        .await?)
}

async fn body_text(client: &Client) -> Result<String> {
    Ok(client.find(Locator::Css("body")).await?.text().await?)
}

fn authorize_url(gw: &Gateway, redirect_uri: &str, state: &str, challenge: &str) -> String {
    let mut u = Url::parse(&gw.url("/oauth2/authorize")).unwrap();
    u.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", CLIENT_ID)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", "profile orders")
        .append_pair("state", state)
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256");
    u.to_string()
}

fn query_map(u: &Url) -> std::collections::HashMap<String, String> {
    u.query_pairs().into_owned().collect()
}

/// The app's side of the loopback redirect: a page to land on, and the queries it received.
async fn spawn_callback_listener() -> (u16, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/callback",
        axum::routing::get(move |axum::extract::RawQuery(q): axum::extract::RawQuery| {
            let record = record.clone();
            async move {
                let q = q.unwrap_or_default();
                let received: Vec<String> = url::form_urlencoded::parse(q.as_bytes())
                    .map(|(k, _)| format!("<li>{k}</li>"))
                    .collect();
                record.lock().unwrap().push(q);
                axum::response::Html(format!(
                    "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
                     <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
                     <title>App callback</title></head><body>\
                     <h1>Back in the app</h1><p>The app received these parameters:</p>\
                     <ul>{}</ul></body></html>",
                    received.concat()
                ))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, seen)
}

struct Env {
    gw: Gateway,
    http: reqwest::Client,
    issuer: String,
    callback_port: u16,
    callback_seen: Arc<Mutex<Vec<String>>>,
    shots: Shots,
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_signs_up_consents_and_lands_on_the_app_redirect_with_a_code() {
    let started = Instant::now();
    // Fail first, and clearly, when the browser is not installed.
    let chromium = require_program("chromium", "CHROMIUM");
    let chromedriver = require_program("chromedriver", "CHROMEDRIVER");
    let artifacts = artifacts_dir();

    let upstream = gatehouse_tests::echo::spawn().await;
    let (callback_port, callback_seen) = spawn_callback_listener().await;
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("manifests");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(
        mdir.join("gatehouse.yaml"),
        manifests(&format!("http://{upstream}")),
    )
    .unwrap();
    let gw = tokio::task::block_in_place(|| Gateway::start(&mdir, &dir.path().join("data"), &[]));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let meta: Value = http
        .get(gw.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let issuer = meta["issuer"].as_str().expect("issuer").to_string();
    let gateway_up = started.elapsed();

    let driver = tokio::task::block_in_place(|| {
        Chromedriver::start(&chromedriver, artifacts.join("chromedriver.log"))
    });
    let profile = tempfile::tempdir().unwrap();
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions",
                "--hide-scrollbars", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        },
        // Network events, to see the redirect to a custom scheme the browser cannot open.
        "goog:loggingPrefs": {"performance": "ALL"},
    });
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "chromedriver could not start Chromium ({e}); chromedriver's log:\n{}",
                driver.logs()
            )
        });

    let browser_up = started.elapsed();

    let env = Env {
        gw,
        http,
        issuer,
        callback_port,
        callback_seen,
        shots: Shots {
            dir: artifacts.clone(),
        },
    };
    // Close the browser whatever happens, so no Chromium outlives the test.
    let outcome = std::panic::AssertUnwindSafe(flow(&client, &env))
        .catch_unwind()
        .await;
    let _ = client.close().await;
    drop(driver);
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!(
            "{e:#}\n(screenshots in {}; gateway log:)\n{}",
            artifacts.display(),
            env.gw.logs()
        ),
        Err(panic) => std::panic::resume_unwind(panic),
    }
    println!(
        "browser test: gateway ready at {:.1} s, Chromium at {:.1} s, done at {:.1} s; \
         screenshots in {}",
        gateway_up.as_secs_f64(),
        browser_up.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        artifacts.display()
    );
}

async fn flow(client: &Client, env: &Env) -> Result<()> {
    let gw = &env.gw;
    let shots = &env.shots;

    // 1. An unknown client_id: an error page with status 400, no redirect.
    let unknown = authorize_url(gw, "https://evil.example/cb", "xyz", &"A".repeat(43))
        .replace(CLIENT_ID, "no-such-client");
    ensure!(env.http.get(&unknown).send().await?.status() == 400);
    client.goto(&unknown).await?;
    let h1 = heading(client).await?;
    ensure!(h1 == "Unknown application", "error page heading: {h1}");
    ensure!(client.current_url().await?.as_str() == unknown);
    shots.take(client, "error-unknown-client").await?;

    // 2. The app opens the authorization URL with its loopback redirect: the sign-in page.
    let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
    let redirect_uri = format!("http://127.0.0.1:{}/callback", env.callback_port);
    client
        .goto(&authorize_url(gw, &redirect_uri, "xyz", challenge.as_str()))
        .await?;
    let h1 = heading(client).await?;
    ensure!(
        h1 == format!("Sign in to {APP_NAME}"),
        "login heading: {h1}"
    );
    shots.take(client, "login").await?;
    // The same page at a phone's size (iPhone 12-15: 390 x 844 CSS pixels, 3x).
    cdp(
        client,
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": true}),
    )
    .await?;
    let overflow = client
        .execute(
            "return document.documentElement.scrollWidth - window.innerWidth",
            vec![],
        )
        .await?;
    ensure!(
        overflow.as_i64() == Some(0),
        "the login page scrolls sideways on a phone: {overflow}"
    );
    shots.take(client, "login-phone").await?;
    cdp(client, "Emulation.clearDeviceMetricsOverride", json!({})).await?;

    // 3. "Create an account" -> the signup page.
    client
        .find(Locator::LinkText("Create an account"))
        .await?
        .click()
        .await?;
    wait_for_url(client, "the signup page", |u| u.path() == "/signup").await?;
    let h1 = heading(client).await?;
    ensure!(
        h1 == format!("Create an account for {APP_NAME}"),
        "signup heading: {h1}"
    );
    client
        .find(Locator::Id("email"))
        .await?
        .send_keys(EMAIL)
        .await?;
    client
        .find(Locator::Id("password"))
        .await?
        .send_keys(PASSWORD)
        .await?;
    shots.take(client, "signup").await?;
    client
        .find(Locator::Css("form button[type=submit]"))
        .await?
        .click()
        .await?;

    // 4. The consent page lists both scopes by their descriptions.
    wait_for_url(client, "the consent page", |u| u.path() == "/consent").await?;
    let h1 = heading(client).await?;
    ensure!(
        h1 == format!("{APP_NAME} wants to access Mobile API on your behalf"),
        "consent heading: {h1} (page: {})",
        body_text(client).await?
    );
    let text = body_text(client).await?;
    for expected in [
        "Read your profile",
        "See and place your orders",
        &format!("Signed in as {EMAIL}"),
    ] {
        ensure!(
            text.contains(expected),
            "consent page lacks {expected:?}: {text}"
        );
    }
    shots.take(client, "consent").await?;
    client
        .find(Locator::Css("button[name=decision][value=allow]"))
        .await?
        .click()
        .await?;

    // 5. The browser ends on the app's loopback redirect with code, state and iss.
    let landed = wait_for_url(client, "the app's callback", |u| {
        u.port() == Some(env.callback_port) && u.path() == "/callback"
    })
    .await?;
    heading(client).await?;
    shots.take(client, "callback").await?;
    let q = query_map(&landed);
    ensure!(
        q.get("state").map(String::as_str) == Some("xyz"),
        "{landed}"
    );
    ensure!(q.get("iss") == Some(&env.issuer), "{landed}");
    ensure!(!q.contains_key("error"), "{landed}");
    let code = q.get("code").context("no code in the callback")?.clone();
    ensure!(
        *env.callback_seen.lock().unwrap() == [landed.query().unwrap_or_default()],
        "the app's listener got exactly this redirect, once"
    );

    // 6. The app exchanges the code with its verifier and calls the API as the new user.
    let resp = env
        .http
        .post(gw.url("/oauth2/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &redirect_uri),
            ("client_id", CLIENT_ID),
            ("code_verifier", verifier.secret()),
        ])
        .send()
        .await?;
    ensure!(resp.status() == 200, "token: {}", resp.text().await?);
    let tok: Value = resp.json().await?;
    let access = tok["access_token"].as_str().context("access_token")?;
    ensure!(tok["token_type"] == "Bearer", "{tok}");
    ensure!(tok["scope"] == "profile orders", "{tok}");
    let echo: Value = env
        .http
        .get(gw.url("/mobile/hello"))
        .bearer_auth(access)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let user_id = echo["headers"]["x-authenticated-userid"][0]
        .as_str()
        .with_context(|| format!("no X-Authenticated-UserId at the upstream: {echo}"))?;
    ensure!(
        echo["headers"]["x-authenticated-scope"][0] == "profile orders",
        "{echo}"
    );
    let me: Value = env
        .http
        .get(gw.url("/oauth2/userinfo"))
        .bearer_auth(access)
        .send()
        .await?
        .json()
        .await?;
    ensure!(me["sub"] == user_id && me["email"] == EMAIL, "{me}");

    // 7. The same app with its custom-scheme redirect. Signed in and consent remembered, the
    // browser still stops on the consent page, which lists nothing new: nobody typed a password
    // for this request, and any app could have opened it (RFC 8252 8.6). Allow, then
    // 303 myapp://callback. Headless Chromium has no app for that scheme: it aborts that
    // navigation (ERR_ABORTED) and stays on the page it was on, so the current URL cannot show
    // it. The proof is in its network log: the request it started for the redirect target.
    let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
    client
        .goto(&authorize_url(
            gw,
            CUSTOM_REDIRECT,
            "xyz-app",
            challenge.as_str(),
        ))
        .await?;
    wait_for_url(client, "the confirmation page", |u| u.path() == "/consent").await?;
    let text = body_text(client).await?;
    ensure!(
        text.contains(&format!("Signed in as {EMAIL}")) && !text.contains("Read your profile"),
        "confirmation page: {text}"
    );
    let before = client.current_url().await?;
    network_events(client).await?; // forget what came before
    client
        .find(Locator::Css("button[name=decision][value=allow]"))
        .await?
        .click()
        .await?;
    let deadline = Instant::now() + PAGE_TIMEOUT;
    let mut seen = Vec::new();
    let app_url = loop {
        seen.extend(network_events(client).await?);
        let hit = seen.iter().find_map(|e| {
            let p = &e["params"];
            let url = p["request"]["url"].as_str()?;
            (e["method"] == "Network.requestWillBeSent"
                && url.starts_with(&format!("{CUSTOM_REDIRECT}?"))
                && p["redirectResponse"]["status"] == 303)
                .then(|| url.to_string())
        });
        if let Some(u) = hit {
            break u;
        }
        if Instant::now() > deadline {
            bail!(
                "the browser was not sent to {CUSTOM_REDIRECT}; it is at {}; network: {seen:#?}",
                client.current_url().await?
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let app_url = Url::parse(&app_url)?;
    let q = query_map(&app_url);
    ensure!(
        q.get("state").map(String::as_str) == Some("xyz-app"),
        "{app_url}"
    );
    ensure!(q.get("iss") == Some(&env.issuer), "{app_url}");
    let code = q
        .get("code")
        .context("no code in the custom-scheme redirect")?;
    let now_at = client.current_url().await?;
    ensure!(
        now_at.scheme() == "myapp" || now_at == before,
        "after the custom-scheme redirect the browser is at {now_at}"
    );
    // What the app would do with it: exchange the code for its custom-scheme redirect.
    let resp = env
        .http
        .post(gw.url("/oauth2/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", CUSTOM_REDIRECT),
            ("client_id", CLIENT_ID),
            ("code_verifier", verifier.secret()),
        ])
        .send()
        .await?;
    ensure!(
        resp.status() == 200,
        "token for the custom-scheme code: {}",
        resp.text().await?
    );
    Ok(())
}
