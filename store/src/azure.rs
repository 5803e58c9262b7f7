//! Azure Blob Storage as an upstream: the `az://container[/prefix]` URL and its settings; the
//! client itself is `objstore.rs`.
//!
//! The URL names a container, as `az storage blob` commands and object_store do; the storage
//! account comes from the settings, which are the az CLI's:
//! - `AZURE_STORAGE_CONNECTION_STRING`: `AccountName`, `AccountKey`, `SharedAccessSignature`,
//!   `BlobEndpoint` (or `DefaultEndpointsProtocol` and `EndpointSuffix`), and
//!   `UseDevelopmentStorage=true` for Azurite on its default port; when set it wins, as in
//!   the az CLI;
//! - else `AZURE_STORAGE_ACCOUNT` with `AZURE_STORAGE_KEY` or `AZURE_STORAGE_SAS_TOKEN`
//!   (neither: object_store finds a token: `AZURE_CLIENT_ID` / `AZURE_CLIENT_SECRET` /
//!   `AZURE_TENANT_ID`, workload or managed identity, `az login`);
//! - `AZURE_STORAGE_USE_EMULATOR=true`: Azurite's well-known account on 127.0.0.1:10000.
//!
//! The emulator is reached through an explicit endpoint (`http://host:port/account`, the
//! path-style URL Azurite serves) rather than object_store's `with_use_emulator`, which reads
//! the emulator's address from this process's environment, not the one given here.

use std::time::Duration;

use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::ClientConfigKey;

use crate::objstore::{
    build_pair, client_options, process_env, retry_config, split_url, valid_bucket, ObjStore,
};

/// Azurite's well-known development account (public, the same in every Azurite).
const DEV_ACCOUNT: &str = "devstoreaccount1";
const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const DEV_ENDPOINT: &str = "http://127.0.0.1:10000/devstoreaccount1";

/// Parses `az://container[/prefix]`, with the settings from `env` (None: this process's).
pub fn parse_in(
    url: &str,
    timeout: Duration,
    env: Option<&[(String, String)]>,
) -> Result<ObjStore, String> {
    let form = "az://container[/prefix]";
    let rest = url
        .strip_prefix("az://")
        .ok_or_else(|| format!("upstream '{url}': expected {form}"))?;
    let (container, prefix) = split_url(url, rest, form)?;
    valid_bucket(url, container, form)?;
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
    let pair = build_pair(url, |reader| s.builder(container, timeout, reader).build())?;
    let base = if prefix.is_empty() {
        format!("az://{container}")
    } else {
        format!("az://{container}/{prefix}")
    };
    ObjStore::new(
        base,
        format!("container '{container}' (account '{}')", s.account),
        prefix,
        pair,
        timeout,
    )
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Settings {
    account: String,
    key: Option<String>,
    sas: Option<String>,
    /// The account's blob endpoint; None: https://<account>.blob.core.windows.net.
    endpoint: Option<String>,
    /// Other AZURE_* variables object_store understands (service principals, identities...).
    passthrough: Vec<(AzureConfigKey, String)>,
}

/// `Key=Value;Key=Value` pairs of a connection string (values may contain '=').
fn connection_string(text: &str) -> Vec<(String, String)> {
    text.split(';')
        .filter_map(|part| {
            let (k, v) = part.split_once('=')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect()
}

impl Settings {
    fn resolve(env: &[(String, String)]) -> Result<Settings, String> {
        let var = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let truthy =
            |v: Option<String>| v.is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let mut s = if let Some(cs) = var("AZURE_STORAGE_CONNECTION_STRING") {
            let pairs = connection_string(&cs);
            let get = |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
                    .filter(|v| !v.is_empty())
            };
            if truthy(get("usedevelopmentstorage")) {
                let proxy = get("developmentstorageproxyuri");
                Settings {
                    account: DEV_ACCOUNT.into(),
                    key: Some(DEV_KEY.into()),
                    endpoint: Some(proxy.map_or(DEV_ENDPOINT.into(), |p| {
                        format!("{}/{DEV_ACCOUNT}", p.trim_end_matches('/'))
                    })),
                    ..Default::default()
                }
            } else {
                let account = get("accountname").ok_or(
                    "AZURE_STORAGE_CONNECTION_STRING has no AccountName (nor UseDevelopmentStorage=true)",
                )?;
                let endpoint = get("blobendpoint").or_else(|| {
                    let proto = get("defaultendpointsprotocol").unwrap_or("https".into());
                    get("endpointsuffix").map(|sfx| format!("{proto}://{account}.blob.{sfx}"))
                });
                Settings {
                    key: get("accountkey"),
                    sas: get("sharedaccesssignature"),
                    account,
                    endpoint,
                    ..Default::default()
                }
            }
        } else if truthy(var("AZURE_STORAGE_USE_EMULATOR")) {
            Settings {
                account: DEV_ACCOUNT.into(),
                key: Some(DEV_KEY.into()),
                endpoint: Some(DEV_ENDPOINT.into()),
                ..Default::default()
            }
        } else {
            let account = var("AZURE_STORAGE_ACCOUNT").ok_or(
                "no storage account: set AZURE_STORAGE_ACCOUNT (with AZURE_STORAGE_KEY or \
                 AZURE_STORAGE_SAS_TOKEN, or a login) or AZURE_STORAGE_CONNECTION_STRING",
            )?;
            Settings {
                account,
                key: var("AZURE_STORAGE_KEY"),
                sas: var("AZURE_STORAGE_SAS_TOKEN"),
                ..Default::default()
            }
        };
        if let Some(e) = &s.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "blob endpoint '{e}' is not an http:// or https:// URL"
                ));
            }
        }
        for (name, value) in env {
            if !name.starts_with("AZURE_") || value.is_empty() {
                continue;
            }
            let Ok(key) = name.to_ascii_lowercase().parse::<AzureConfigKey>() else {
                continue;
            };
            // Resolved above, or ours to decide.
            let ours = matches!(
                key,
                AzureConfigKey::AccountName
                    | AzureConfigKey::AccessKey
                    | AzureConfigKey::SasKey
                    | AzureConfigKey::UseEmulator
                    | AzureConfigKey::Endpoint
                    | AzureConfigKey::ContainerName
                    | AzureConfigKey::Client(
                        ClientConfigKey::Timeout
                            | ClientConfigKey::ConnectTimeout
                            | ClientConfigKey::ReadTimeout
                    )
            );
            if !ours {
                s.passthrough.push((key, value.clone()));
            }
        }
        Ok(s)
    }

    fn builder(&self, container: &str, timeout: Duration, reader: bool) -> MicrosoftAzureBuilder {
        let mut b = MicrosoftAzureBuilder::new()
            .with_client_options(client_options(timeout, reader))
            .with_retry(retry_config(timeout));
        // After the client options: these adjust them rather than replace them.
        for (key, value) in &self.passthrough {
            b = b.with_config(*key, value);
        }
        b = b.with_account(&self.account).with_container_name(container);
        if let Some(k) = &self.key {
            b = b.with_access_key(k);
        } else if let Some(sas) = &self.sas {
            b = b.with_config(AzureConfigKey::SasKey, sas.trim_start_matches('?'));
        }
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e.trim_end_matches('/').to_owned());
            if e.starts_with("http://") {
                b = b.with_allow_http(true);
            }
        }
        b
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
        let err = Settings::resolve(&env(&[])).unwrap_err();
        assert!(err.contains("AZURE_STORAGE_ACCOUNT"), "{err}");
        let s = Settings::resolve(&env(&[
            ("AZURE_STORAGE_ACCOUNT", "acct"),
            ("AZURE_STORAGE_KEY", "a2V5"),
            ("AZURE_CLIENT_ID", "cid"),
        ]))
        .unwrap();
        assert_eq!(s.account, "acct");
        assert_eq!(s.key.as_deref(), Some("a2V5"));
        assert_eq!(s.endpoint, None);
        assert_eq!(
            s.passthrough,
            vec![(AzureConfigKey::ClientId, "cid".into())]
        );

        // The connection string wins.
        let s = Settings::resolve(&env(&[
            ("AZURE_STORAGE_ACCOUNT", "other"),
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5==;\
                 BlobEndpoint=http://127.0.0.1:5/devstoreaccount1;",
            ),
        ]))
        .unwrap();
        assert_eq!(s.account, "devstoreaccount1");
        assert_eq!(s.key.as_deref(), Some("a2V5=="));
        assert_eq!(
            s.endpoint.as_deref(),
            Some("http://127.0.0.1:5/devstoreaccount1")
        );
        let s = Settings::resolve(&env(&[(
            "AZURE_STORAGE_CONNECTION_STRING",
            "AccountName=a;SharedAccessSignature=sv=1&sig=x;EndpointSuffix=core.example",
        )]))
        .unwrap();
        assert_eq!(s.sas.as_deref(), Some("sv=1&sig=x"));
        assert_eq!(s.endpoint.as_deref(), Some("https://a.blob.core.example"));

        for e in [
            env(&[(
                "AZURE_STORAGE_CONNECTION_STRING",
                "UseDevelopmentStorage=true",
            )]),
            env(&[("AZURE_STORAGE_USE_EMULATOR", "true")]),
        ] {
            let s = Settings::resolve(&e).unwrap();
            assert_eq!(s.account, DEV_ACCOUNT);
            assert_eq!(s.endpoint.as_deref(), Some(DEV_ENDPOINT));
            assert_eq!(s.key.as_deref(), Some(DEV_KEY));
        }
    }

    #[test]
    fn urls() {
        let t = Duration::from_secs(1);
        let e = env(&[("AZURE_STORAGE_USE_EMULATOR", "true")]);
        let s = parse_in("az://c/p/q/", t, Some(&e)).unwrap();
        assert_eq!(s.url_of("tags/x"), "az://c/p/q/tags/x");
        for bad in ["az://", "az:///x", "az://c/a//c", "az://c d", "az://c?x=1"] {
            let err = parse_in(bad, t, Some(&e)).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }
}
