//! Headless Chromium for the dashboard's browser tests, driven through
//! ChromeDriver (Debian's `chromium` and `chromium-driver`; `.ci/run` installs
//! them). One place knows how to start the driver on a free port, open a
//! session the way tests run (as root in CI, where Chromium's sandbox cannot
//! start), and wait for what a page shows instead of sleeping.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use fantoccini::{Client, Locator};

/// A ChromeDriver on a free loopback port, killed when dropped.
pub struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Starts ChromeDriver and opens a headless Chromium session on it. Panics
/// with the install command when either is missing: a browser test that
/// cannot run must fail, not pass.
pub async fn driver() -> (Driver, Client) {
    let binary = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromedriver is missing: apt-get install chromium chromium-driver (.ci/run does)");
    let port = free_port();
    let child = Command::new(binary)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_string(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            // Tests run as root in CI, where Chromium's sandbox cannot start.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]
        }),
    );
    // ChromeDriver accepts sessions once it listens; ask until it does.
    let mut last = None;
    let session = poll_until(200, async || {
        match fantoccini::ClientBuilder::rustls()
            .expect("rustls roots")
            .capabilities(caps.clone())
            .connect(&driver.url)
            .await
        {
            Ok(c) => Some(c),
            Err(e) => {
                last = Some(e);
                None
            }
        }
    })
    .await;
    match session {
        Some(c) => (driver, c),
        None => panic!("chromedriver never accepted a session: {last:?}"),
    }
}

/// Looks up to `polls` times, 50 ms apart, until `look` finds what the caller
/// waits for: the one waiting loop of these helpers, so every wait has the same
/// pace and a slow machine only waits longer.
async fn poll_until<T>(polls: usize, mut look: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    for _ in 0..polls {
        if let Some(found) = look().await {
            return Some(found);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Saves the page as `dir/name.png`.
pub async fn shot(c: &Client, dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).expect("the screenshot directory");
    let png = c.screenshot().await.expect("a screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("the screenshot is saved");
}

/// The text of the first element `css` selects.
pub async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
        .text()
        .await
        .expect("the element's text")
}

/// Whether the page has an element `css` selects.
pub async fn has(c: &Client, css: &str) -> bool {
    c.find(Locator::Css(css)).await.is_ok()
}

/// Clicks the first element `css` selects.
pub async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} to click: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

/// Clicks the first element `css` selects (a form's button) and waits until
/// the page the form's answer loads is in: a wait for text alone passes at once
/// when the answer is the page the form was on, and a `goto` made then can be
/// overtaken by the form's navigation still under way (found by the dashboard
/// test: a visit to the overview just after a release stayed on the routes
/// page). The old page is marked before the click; the new one has no mark.
pub async fn submit(c: &Client, css: &str) {
    c.execute("window.__ficusSubmitted = true", vec![])
        .await
        .unwrap_or_else(|e| panic!("marking the page before submitting {css}: {e}"));
    click(c, css).await;
    let loaded = poll_until(1200, async || {
        // An error is a page between documents: look again.
        let loaded = c
            .execute(
                "return window.__ficusSubmitted === undefined && document.readyState === 'complete'",
                vec![],
            )
            .await
            .ok()?;
        (loaded.as_bool() == Some(true)).then_some(())
    })
    .await;
    if loaded.is_none() {
        panic!("submitting {css} never loaded the answer's page");
    }
}

/// Clears the first element `css` selects and types `keys` into it.
pub async fn fill(c: &Client, css: &str, keys: &str) {
    let field = c
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} to type into: {e}"));
    field
        .clear()
        .await
        .unwrap_or_else(|e| panic!("clearing {css}: {e}"));
    field
        .send_keys(keys)
        .await
        .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
}

/// Waits until the element's text satisfies `ok`: an event on the page, with a
/// generous bound so a slow machine only waits longer.
pub async fn until_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    match try_until_text(c, css, ok, 1200).await {
        Ok(t) => t,
        Err(seen) => panic!("{css} never changed as expected; last seen {seen:?}"),
    }
}

/// [`until_text`] that gives up after `polls` looks and returns the last text
/// seen, for a test that can do its action again (a click the page's live
/// update raced).
pub async fn try_until_text(
    c: &Client,
    css: &str,
    ok: impl Fn(&str) -> bool,
    polls: usize,
) -> Result<String, String> {
    let mut seen = String::new();
    let found = poll_until(polls, async || {
        let t = c.find(Locator::Css(css)).await.ok()?.text().await.ok()?;
        if ok(&t) {
            return Some(t);
        }
        seen = t;
        None
    })
    .await;
    found.ok_or(seen)
}
