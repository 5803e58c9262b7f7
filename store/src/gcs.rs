//! Google Cloud Storage as an upstream: the `gs://bucket[/prefix]` URL and its settings; the
//! client itself is `objstore.rs`.
//!
//! Settings are the ones gcloud and Google's client libraries use, so that a machine set up
//! for them needs nothing more:
//! - `GOOGLE_APPLICATION_CREDENTIALS`: a service account key file or an authorized-user
//!   file (application default credentials); without it,
//!   `~/.config/gcloud/application_default_credentials.json` (what `gcloud auth
//!   application-default login` writes), else the metadata server of a GCE/GKE machine;
//! - `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_SERVICE_ACCOUNT_PATH` (a key file) or
//!   `GOOGLE_SERVICE_ACCOUNT_KEY` (the key's JSON), object_store's own names, win over those;
//! - `STORAGE_EMULATOR_HOST` (`host:port` or a URL), as Google's client libraries honour it:
//!   requests go there, unsigned (emulators take no credentials);
//! - `GOOGLE_CLOUD_PROJECT` is accepted and not needed: object reads and writes in an
//!   existing bucket name no project.

use std::path::PathBuf;
use std::time::Duration;

use object_store::gcp::GoogleCloudStorageBuilder;

use crate::objstore::{
    build_pair, client_options, process_env, retry_config, split_url, valid_bucket, ObjStore,
};

/// Parses `gs://bucket[/prefix]`, with the settings from `env` (None: this process's).
pub fn parse_in(
    url: &str,
    timeout: Duration,
    env: Option<&[(String, String)]>,
) -> Result<ObjStore, String> {
    let form = "gs://bucket[/prefix]";
    let rest = url
        .strip_prefix("gs://")
        .ok_or_else(|| format!("upstream '{url}': expected {form}"))?;
    let (bucket, prefix) = split_url(url, rest, form)?;
    valid_bucket(url, bucket, form)?;
    if timeout.is_zero() {
        return Err(format!(
            "upstream '{url}': the timeout must be more than zero"
        ));
    }
    let own;
    let env = match env {
        Some(e) => e,
        None => {
            own = process_env();
            &own[..]
        }
    };
    let s = Settings::resolve(env).map_err(|e| format!("upstream '{url}': {e}"))?;
    let pair = build_pair(url, |reader| s.builder(bucket, timeout, reader).build())?;
    let base = if prefix.is_empty() {
        format!("gs://{bucket}")
    } else {
        format!("gs://{bucket}/{prefix}")
    };
    ObjStore::new(base, format!("bucket '{bucket}'"), prefix, pair, timeout)
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Settings {
    /// The emulator's base URL (`http://host:port`), from STORAGE_EMULATOR_HOST.
    emulator: Option<String>,
    service_account_path: Option<String>,
    service_account_key: Option<String>,
    /// Application default credentials: GOOGLE_APPLICATION_CREDENTIALS, or gcloud's file.
    application_credentials: Option<String>,
}

impl Settings {
    fn resolve(env: &[(String, String)]) -> Result<Settings, String> {
        let var = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let emulator = var("STORAGE_EMULATOR_HOST").map(|h| {
            let h = h.trim_end_matches('/');
            if h.starts_with("http://") || h.starts_with("https://") {
                h.to_owned()
            } else {
                format!("http://{h}")
            }
        });
        let service_account_path =
            var("GOOGLE_SERVICE_ACCOUNT").or_else(|| var("GOOGLE_SERVICE_ACCOUNT_PATH"));
        let service_account_key = var("GOOGLE_SERVICE_ACCOUNT_KEY");
        if service_account_path.is_some() && service_account_key.is_some() {
            return Err(
                "GOOGLE_SERVICE_ACCOUNT(_PATH) and GOOGLE_SERVICE_ACCOUNT_KEY are both set".into(),
            );
        }
        let gcloud_file = var("HOME")
            .map(|h| PathBuf::from(h).join(".config/gcloud/application_default_credentials.json"))
            .filter(|p| p.is_file())
            .map(|p| p.display().to_string());
        let application_credentials = var("GOOGLE_APPLICATION_CREDENTIALS").or(gcloud_file);
        Ok(Settings {
            emulator,
            service_account_path,
            service_account_key,
            application_credentials,
        })
    }

    fn builder(&self, bucket: &str, timeout: Duration, reader: bool) -> GoogleCloudStorageBuilder {
        let mut opts = client_options(timeout, reader);
        let mut b = GoogleCloudStorageBuilder::new()
            .with_retry(retry_config(timeout))
            .with_bucket_name(bucket);
        if let Some(e) = &self.emulator {
            // An emulator takes no credentials: requests are unsigned where object_store
            // allows it, and the PUT path, which asks for a token regardless, gets a static
            // placeholder, so no token is ever fetched (from a metadata server or Google).
            b = b
                .with_base_url(e)
                .with_skip_signature(true)
                .with_bearer_token("emulator");
            if e.starts_with("http://") {
                opts = opts.with_allow_http(true);
            }
        } else {
            if let Some(p) = &self.service_account_path {
                b = b.with_service_account_path(p);
            }
            if let Some(k) = &self.service_account_key {
                b = b.with_service_account_key(k);
            }
            if let Some(p) = &self.application_credentials {
                b = b.with_application_credentials(p);
            }
        }
        b.with_client_options(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn settings() {
        let s = Settings::resolve(&env(&[("HOME", "/nonexistent")])).unwrap();
        assert_eq!(s, Settings::default());
        let s = Settings::resolve(&env(&[
            ("STORAGE_EMULATOR_HOST", "localhost:9023"),
            ("GOOGLE_APPLICATION_CREDENTIALS", "/k.json"),
            ("GOOGLE_CLOUD_PROJECT", "p"),
        ]))
        .unwrap();
        assert_eq!(s.emulator.as_deref(), Some("http://localhost:9023"));
        assert_eq!(s.application_credentials.as_deref(), Some("/k.json"));
        let s = Settings::resolve(&env(&[("STORAGE_EMULATOR_HOST", "https://h:1/")])).unwrap();
        assert_eq!(s.emulator.as_deref(), Some("https://h:1"));
        let err = Settings::resolve(&env(&[
            ("GOOGLE_SERVICE_ACCOUNT", "/a"),
            ("GOOGLE_SERVICE_ACCOUNT_KEY", "{}"),
        ]))
        .unwrap_err();
        assert!(err.contains("both"), "{err}");
    }

    #[test]
    fn urls() {
        let t = Duration::from_secs(1);
        let e = env(&[("STORAGE_EMULATOR_HOST", "127.0.0.1:9")]);
        let s = parse_in("gs://b/p/q/", t, Some(&e)).unwrap();
        assert_eq!(s.url_of("tags/x"), "gs://b/p/q/tags/x");
        for bad in ["gs://", "gs:///x", "gs://b/a//c", "gs://b c", "gs://b?x=1"] {
            let err = parse_in(bad, t, Some(&e)).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }
}
