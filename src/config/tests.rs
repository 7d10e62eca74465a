//! The configuration's tests: every key's defaults, checks and messages.

use super::output::{ownership_problems, Credentials};
use super::*;

/// The smallest valid configuration, for the tests of other modules too.
pub(crate) const MINIMAL: &str = "
magento:
  base_url: https://shop.example.com
output:
  dir: /tmp
customers:
  - name: alice
    username: alice@example.com
    password_env: ALICE_PASSWORD
";

fn problems(yaml: &str) -> Vec<String> {
    parse(yaml, Checks::Static).unwrap_err().iter().map(|p| p.to_string()).collect()
}

/// The sidecar image's build: `output.kubernetes` is parsed and checked as always, then
/// refused by name, with what to do instead (scripts/test runs this without the feature).
#[cfg(not(feature = "kubernetes"))]
#[test]
fn without_the_kubernetes_feature_output_kubernetes_is_refused_by_name() {
    let kube = MINIMAL.replace("  dir: /tmp\n", "  kubernetes:\n    secret: magento-tokens\n");
    assert_eq!(problems(&kube), ["output.kubernetes: this build has no Kubernetes support (the sidecar image); use the central image, or build with --features kubernetes"]);
    // Its own checks still run: a bad key is reported beside it.
    let bad = kube.replace("secret: magento-tokens", "secret: Not_A_Name");
    let p = problems(&bad);
    assert!(p.len() == 2 && p.iter().any(|p| p.starts_with("output.kubernetes.secret")), "{p:?}");
}

#[test]
fn output_kubernetes_replaces_output_dir() {
    let kube = MINIMAL.replace("  dir: /tmp\n", "  kubernetes:\n    secret: magento-tokens\n    namespace: shop\n");
    let c = parse(&kube, Checks::Static).unwrap();
    let Output::Kubernetes(k) = &c.output else { panic!("{:?}", c.output) };
    assert_eq!(
        (k.secret.as_str(), k.lease.as_str(), k.namespace.as_deref()),
        ("magento-tokens", "magento-tokens", Some("shop"))
    );
    assert_eq!(c.customers[0].file, "alice", "the Secret's key");
    let both = MINIMAL.replace("  dir: /tmp\n", "  dir: /tmp\n  kubernetes:\n    secret: t\n");
    assert_eq!(problems(&both), ["output.kubernetes: give exactly one of output.dir and output.kubernetes, not both"]);
    let neither = MINIMAL.replace("  dir: /tmp\n", "  mode: \"0600\"\n");
    assert_eq!(problems(&neither), ["output.dir: one of output.dir and output.kubernetes is required"]);
    let file_only = kube.replace("    namespace: shop\n", "  index: tokens.json\n  uid: 1000\n");
    let p = problems(&file_only);
    assert!(p[0].starts_with("output.uid: does not apply to output.kubernetes"), "{p:?}");
    assert!(p[1].starts_with("output.index: is not written with output.kubernetes"), "{p:?}");
    let told = kube.clone() + "notify:\n  webhook: http://127.0.0.1:8080/rotated\n";
    let p = problems(&told);
    assert!(p.len() == 1 && p[0].starts_with("notify: does not apply to output.kubernetes"), "{p:?}");
    let bad_key = format!("{kube}    file: alice token\n");
    assert!(problems(&bad_key)[0].starts_with("customers[0].file: \"alice token\" cannot be a key of the Secret"));
    // 600 customers with json tokens of up to 2 KiB: more than 1 MiB.
    let mut many = kube.clone();
    for i in 0..600 {
        many += &format!("  - name: c{i}\n    username: c{i}@x.com\n    password_env: PW\n    format: json\n");
    }
    let p = problems(&many);
    assert!(
        p[0].starts_with("customers: 601 customers' tokens would not fit in the Secret \"magento-tokens\""),
        "{p:?}"
    );
}

#[test]
fn the_token_api_is_a_key_of_output_kubernetes_served_on_admin_listen() {
    let kube = MINIMAL.replace("  dir: /tmp\n", "  kubernetes:\n    secret: magento-tokens\n    token_api: true\n");
    let listening = format!("{kube}admin:\n  listen: 0.0.0.0:9102\n");
    let c = parse(&listening, Checks::Static).unwrap();
    let Output::Kubernetes(k) = &c.output else { panic!("{:?}", c.output) };
    assert!(k.token_api);
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    // On loopback (the default admin.listen) no other pod reaches it: allowed, with a warning.
    let c = parse(&kube, Checks::Static).unwrap();
    let w: Vec<String> = c.warnings().iter().map(|p| p.to_string()).collect();
    assert!(w.len() == 1 && w[0].starts_with("admin.listen: 127.0.0.1:9102 is a loopback address"), "{w:?}");
    // Without an admin server there is nothing to serve it on.
    let none = format!("{kube}admin:\n  listen: \"\"\n");
    let p = problems(&none);
    assert!(
        p.len() == 1
            && p[0].starts_with("output.kubernetes.token_api: the token API is served on admin.listen, which is \"\""),
        "{p:?}"
    );
    // Not a key of output, with files or with the Secret: where it belongs is said.
    let p = problems(&MINIMAL.replace("  dir: /tmp\n", "  dir: /tmp\n  token_api: true\n"));
    assert!(
        p.len() == 1
            && p[0].starts_with(
                "output.token_api: the token API answers tokens from the Secret of output.kubernetes (central mode)"
            ),
        "{p:?}"
    );
    let p = problems(&kube.replace("    token_api: true\n", "  token_api: true\n"));
    assert_eq!(p, ["output.token_api: is a key of output.kubernetes: write it as output.kubernetes.token_api"]);
    let p = problems(&kube.replace("token_api: true", "token_api: yes please"));
    assert!(p.len() == 1 && p[0].contains("token_api"), "{p:?}");
}

#[test]
fn defaults_are_the_contracts() {
    let c = parse(MINIMAL, Checks::Static).unwrap();
    assert_eq!(c.magento.timeout, Duration::from_secs(10));
    assert_eq!(c.refresh.before_expiry, Duration::from_secs(15 * 60));
    assert_eq!(c.refresh.jitter, Duration::from_secs(60));
    assert_eq!(c.refresh.default_lifetime, Duration::from_secs(3600));
    assert_eq!(c.refresh.min_backoff, Duration::from_secs(1));
    assert_eq!(c.refresh.max_backoff, Duration::from_secs(300));
    assert_eq!(c.refresh.max_auth_failures, 3);
    assert_eq!(c.refresh.auth_failure_pause, Duration::from_secs(31 * 60));
    assert_eq!(c.refresh.max_concurrent_logins, 8);
    assert_eq!(dir(&c).mode, 0o600);
    assert_eq!(c.customers[0].format, Format::Raw);
    assert_eq!(c.admin_listen, Some("127.0.0.1:9102".parse().unwrap()));
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.level, "info");
    let alice = &c.customers[0];
    assert_eq!(dir(&c).path(alice), PathBuf::from("/tmp/alice"));
    assert_eq!(
        alice.endpoint(),
        Endpoint::Rest {
            token: Url::parse("https://shop.example.com/rest/V1/integration/customer/token").unwrap(),
            me: Url::parse("https://shop.example.com/rest/V1/customers/me").unwrap(),
        }
    );
}

#[test]
fn store_codes_and_path_prefixes_build_the_url() {
    let yaml = MINIMAL.replace("https://shop.example.com", "https://example.com/shop/").replace(
            "    password_env: ALICE_PASSWORD",
            "    password_env: ALICE_PASSWORD\n    store_code: de\n  - name: bob\n    username: b\n    password_env: B\n    base_url: https://shop.fr\n    file: bob.json",
        );
    let c = parse(&yaml, Checks::Static).unwrap();
    let Endpoint::Rest { token, .. } = c.customers[0].endpoint() else { panic!("REST by default") };
    assert_eq!(token.as_str(), "https://example.com/shop/rest/de/V1/integration/customer/token");
    let Endpoint::Rest { me, .. } = c.customers[1].endpoint() else { panic!("REST by default") };
    assert_eq!(me.as_str(), "https://shop.fr/rest/V1/customers/me");
    assert_eq!(dir(&c).path(&c.customers[1]), PathBuf::from("/tmp/bob.json"));
}

/// MINIMAL with `lines` added under `magento:`.
fn with_magento(lines: &str) -> String {
    MINIMAL.replace("  base_url: https://shop.example.com\n", &format!("  base_url: https://shop.example.com\n{lines}"))
}

#[test]
fn graphql_logins_go_to_the_graphql_endpoint_with_the_store_code_in_a_header() {
    let c = parse(MINIMAL, Checks::Static).unwrap();
    assert_eq!(c.customers[0].api, Api::Rest, "REST unless told");
    let yaml = with_magento("  api: graphql\n  store_code: en\n").replace(
        "    password_env: ALICE_PASSWORD",
        "    password_env: ALICE_PASSWORD\n  - name: hans\n    username: h@example.de\n    password_env: H\n    store_code: de\n    base_url: https://example.com/shop/",
    );
    let c = parse(&yaml, Checks::Static).unwrap();
    let graphql =
        |url: &str, store: &str| Endpoint::GraphQl { url: Url::parse(url).unwrap(), store: Some(store.into()) };
    assert_eq!(c.customers[0].endpoint(), graphql("https://shop.example.com/graphql", "en"));
    assert_eq!(c.customers[1].endpoint(), graphql("https://example.com/shop/graphql", "de"), "its own store code");
    assert_eq!(c.customers[1].endpoint().to_string(), "https://example.com/shop/graphql (Store: de)");
    let c = parse(&with_magento("  api: graphql\n  graphql_path: /api/graphql\n"), Checks::Static).unwrap();
    assert_eq!(
        c.customers[0].endpoint(),
        Endpoint::GraphQl { url: Url::parse("https://shop.example.com/api/graphql").unwrap(), store: None }
    );
    // graphql_path alone changes nothing: REST stays the dialect.
    let c = parse(&with_magento("  graphql_path: /gql\n"), Checks::Static).unwrap();
    assert!(matches!(c.customers[0].endpoint(), Endpoint::Rest { .. }));
}

#[test]
fn the_cloud_service_implies_graphql_under_the_tenant() {
    let yaml = with_magento("  cloud_service: true\n  store_code: default\n")
        .replace("https://shop.example.com", "https://na1.api.commerce.adobe.com/Ab3dEfGh1jK2");
    let c = parse(&yaml, Checks::Static).unwrap();
    assert_eq!(c.customers[0].api, Api::CloudService { graphql_path: "/graphql".into() });
    assert_eq!(
        c.customers[0].endpoint(),
        Endpoint::GraphQl {
            url: Url::parse("https://na1.api.commerce.adobe.com/Ab3dEfGh1jK2/graphql").unwrap(),
            store: Some("default".into()),
        }
    );
    let explicit = yaml.replace("  cloud_service: true\n", "  cloud_service: true\n  api: graphql\n");
    assert_eq!(parse(&explicit, Checks::Static).unwrap().customers[0].api, c.customers[0].api);
    // Its REST routes (the one-time codes of cloud_service_otp) have no /rest and no store code.
    assert_eq!(
        c.customers[0].rest_url("V1/customer/42/otp").as_str(),
        "https://na1.api.commerce.adobe.com/Ab3dEfGh1jK2/V1/customer/42/otp"
    );
    let on_premises = parse(&with_magento("  store_code: de\n"), Checks::Static).unwrap();
    assert_eq!(
        on_premises.customers[0].rest_url("V1/customers/me").as_str(),
        "https://shop.example.com/rest/de/V1/customers/me"
    );
}

#[test]
fn check_refuses_what_cannot_work_naming_each_key_at_once() {
    let yaml = with_magento("  api: rest\n  cloud_service: true\n  graphql_path: graphql\n").replace(
        "    password_env: ALICE_PASSWORD",
        "    password_env: ALICE_PASSWORD\n  - name: bob\n    username: b\n    password_env: B\n    base_url: https://eu1.api.commerce.adobe.com/",
    );
    let p = problems(&yaml);
    let expect = [
        "magento.graphql_path: \"graphql\" must start with '/'",
        "magento.api: rest cannot log customers in on Adobe Commerce as a Cloud Service",
        "magento.base_url: \"https://shop.example.com/\" has no tenant id",
        "customers[1].base_url: \"https://eu1.api.commerce.adobe.com/\" has no tenant id",
    ];
    for e in expect {
        assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
    let p = problems(&with_magento("  api: graphql\n  store_code: all\n  graphql_path: /graph ql?x\n"));
    assert!(p[0].starts_with("magento.graphql_path: \"/graph ql?x\" must be a path alone"), "{p:?}");
    assert!(p[1].starts_with("magento.store_code: \"all\" is no store view"), "{p:?}");
    // REST takes `all` (its checks stop, as the worker says).
    assert!(parse(&with_magento("  store_code: all\n"), Checks::Static).is_ok());
    let p = problems(&with_magento("  api: soap\n"));
    assert!(p[0].starts_with("magento.api: unknown variant `soap`, expected `rest` or `graphql`"), "{p:?}");
}

#[test]
fn unknown_keys_are_reported_with_path_and_line() {
    let p = problems(&MINIMAL.replace("  base_url:", "  base_ur: x\n  base_url:"));
    assert_eq!(p.len(), 1);
    assert!(p[0].contains("unknown field `base_ur`"), "{p:?}");
    assert!(p[0].contains("line 3 column"), "{p:?}");
    assert!(p[0].starts_with("magento"), "{p:?}");
}

#[test]
fn a_bare_number_mode_is_refused() {
    for bare in ["0600", "600", "384", "0o600"] {
        let p = problems(&MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  mode: {bare}")));
        assert!(p[0].starts_with("output.mode: "), "{p:?}");
        assert!(p[0].contains("quoted octal string"), "{p:?}");
    }
    let flow = MINIMAL.replace("output:\n  dir: /tmp", "output: {dir: /tmp, mode: 0600}");
    assert!(problems(&flow)[0].starts_with("output.mode: "));
    let quoted = MINIMAL.replace("output:\n  dir: /tmp", "output: {dir: /tmp, mode: \"0600\"}");
    assert_eq!(dir(&parse(&quoted, Checks::Static).unwrap()).mode, 0o600);
    for odd in ["1777", "+0600", "600", "0o600", "00600", " 0600", "0600\n", "-600", "０６００"] {
        let p = problems(&MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  mode: {odd:?}")));
        assert!(p[0].starts_with("output.mode: "), "{odd:?}: {p:?}");
        assert!(p[0].contains("exactly four octal digits between \"0000\" and \"0777\""), "{odd:?}: {p:?}");
    }
    let c = parse(&MINIMAL.replace("  dir: /tmp", "  dir: /tmp\n  mode: \"0640\""), Checks::Static).unwrap();
    assert_eq!(dir(&c).mode, 0o640);
}

#[test]
fn modes_that_let_others_write_token_files_are_refused() {
    let with_mode = |mode: &str| MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  mode: \"{mode}\""));
    for bad in ["0666", "0620", "0602", "0660", "0622", "0777"] {
        let p = problems(&with_mode(bad));
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert!(p[0].starts_with("output.mode: \"0"), "{bad}: {p:?}");
        assert!(p[0].contains("writable by its group or by others"), "{bad}: {p:?}");
    }
    for good in ["0600", "0640", "0440", "0400", "0644"] {
        assert!(parse(&with_mode(good), Checks::Static).is_ok(), "{good}");
    }
}

#[test]
fn modes_no_one_can_read_are_refused_and_others_reading_is_a_warning() {
    let with_mode = |mode: &str| MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  mode: \"{mode}\""));
    for none in ["0000", "0200", "0100", "0300"] {
        let p = problems(&with_mode(none));
        assert_eq!(p, [format!("output.mode: \"{none}\" lets no one read the token files, the app included; use \"0600\" (or \"0640\" for readers in the file's group)")]);
    }
    for (mode, warned) in
        [("0600", false), ("0640", false), ("0400", false), ("0644", true), ("0604", true), ("0444", true)]
    {
        let warnings: Vec<String> =
            parse(&with_mode(mode), Checks::Static).unwrap().warnings().iter().map(|w| w.to_string()).collect();
        let about_mode: Vec<&String> = warnings.iter().filter(|w| w.starts_with("output.mode: ")).collect();
        assert_eq!(about_mode.len(), usize::from(warned), "{mode}: {warnings:?}");
        if warned {
            assert!(about_mode[0].contains(&format!("\"{mode}\" makes every token file readable by other users")));
        }
    }
}

#[test]
fn an_output_directory_others_can_write_is_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let yaml = MINIMAL.replace("  dir: /tmp", &format!("  dir: {}", dir.path().display()));
    let config = parse(&yaml, Checks::Static).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
    assert!(config.warnings().is_empty());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let w: Vec<String> = config.warnings().iter().map(|p| p.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("output.dir: ") && w[0].contains("(mode 1777)"), "{w:?}");
    assert!(w[0].contains("another user can plant files or symbolic links there"), "{w:?}");
}

/// The output directory's settings of a configuration that has one.
fn dir(c: &Config) -> &OutputDir {
    c.output.dir().expect("output.dir")
}

fn with_output(lines: &str) -> String {
    MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n{lines}"))
}

#[test]
fn the_owner_reaches_every_file_written() {
    let c = parse(MINIMAL, Checks::Static).unwrap();
    assert_eq!(dir(&c).owner, Owner::default());
    let c = parse(&with_output("  mode: \"0640\"\n  uid: 1000\n  gid: 2000"), Checks::Static).unwrap();
    let owner = Owner { uid: Some(1000), gid: Some(2000) };
    assert_eq!(dir(&c).owner, owner);
    assert_eq!(dir(&c).perms(), Perms { mode: 0o640, owner });
    let c = parse(&with_output("  gid: 0"), Checks::Static).unwrap();
    assert_eq!(dir(&c).owner, Owner { uid: None, gid: Some(0) });
}

#[test]
fn an_owner_is_a_number_that_names_an_id() {
    for (lines, key) in [
        ("  uid: -1", "output.uid: "),
        ("  uid: \"1000\"", "output.uid: "),
        ("  gid: 1.5", "output.gid: "),
        ("  gid: 4294967296", "output.gid: "),
    ] {
        let p = problems(&with_output(lines));
        assert_eq!(p.len(), 1, "{lines}: {p:?}");
        assert!(p[0].starts_with(key), "{lines}: {p:?}");
    }
    let p = problems(&with_output("  uid: 4294967295\n  gid: 4294967295"));
    assert_eq!(
        p,
        [
            "output.uid: 4294967295: not an id (chown reads it as \"leave unchanged\")",
            "output.gid: 4294967295: not an id (chown reads it as \"leave unchanged\")"
        ]
    );
}

#[test]
fn giving_files_away_follows_the_kernels_rules() {
    let nobody = Credentials { uid: 65534, gid: 65534, groups: vec![2000], chown: false, fowner: false };
    let owner = |uid: Option<u32>, gid: Option<u32>| Owner { uid, gid };
    let refused = |owner: Owner, c: &Credentials| -> Vec<String> {
        ownership_problems(owner, c).iter().map(|p| p.to_string()).collect()
    };
    // Its own ids, and a supplementary group: no privilege needed.
    assert!(refused(owner(Some(65534), Some(65534)), &nobody).is_empty());
    assert!(refused(owner(None, Some(2000)), &nobody).is_empty());
    assert_eq!(
            refused(owner(Some(1000), Some(3000)), &nobody),
            [
                "output.uid: 1000: this process (uid 65534) may not give files away; run as root or with CAP_CHOWN and CAP_FOWNER, or drop output.uid",
                "output.gid: 3000: this process (uid 65534) is not a member of group 3000 and may not give files to it; run it in that group (in Kubernetes: the pod's fsGroup or supplementalGroups), as root or with CAP_CHOWN, or drop output.gid",
            ]
        );
    // Root with every capability dropped but CHOWN: any group, but no other user.
    let chown_only = Credentials { uid: 0, gid: 0, groups: vec![], chown: true, fowner: false };
    assert!(refused(owner(None, Some(3000)), &chown_only).is_empty());
    assert_eq!(
            refused(owner(Some(1000), None), &chown_only),
            ["output.uid: 1000: this process (uid 0) has CAP_CHOWN but not CAP_FOWNER, which it needs to set the mode of a file it gave away; add CAP_FOWNER, or drop output.uid"]
        );
    // Root without CAP_CHOWN is refused like anyone; with both, anything goes.
    let root_without = Credentials { chown: false, fowner: true, ..chown_only.clone() };
    assert_eq!(refused(owner(Some(1000), Some(3000)), &root_without).len(), 2);
    assert!(refused(owner(Some(0), Some(0)), &root_without).is_empty(), "root's own ids");
    let root = Credentials { chown: true, fowner: true, ..chown_only };
    assert!(refused(owner(Some(1000), Some(3000)), &root).is_empty());
}

#[test]
fn check_gives_a_test_file_the_owner_and_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, gid) = match rustix::process::geteuid().is_root() {
        true => (4321, 8765),
        false => (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw()),
    };
    let yaml = format!(
            "magento:\n  base_url: https://x\noutput:\n  dir: {}\n  uid: {uid}\n  gid: {gid}\ncustomers:\n  - name: a\n    username: a\n    password_env: PATH\n",
            dir.path().display()
        );
    parse(&yaml, Checks::Environment).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left in the directory");
}

#[test]
fn durations_must_be_strings_with_units() {
    let p = problems(&format!("{MINIMAL}refresh:\n  jitter: 60\n"));
    assert!(p[0].starts_with("refresh.jitter: "), "{p:?}");
    let p = problems(&format!("{MINIMAL}refresh:\n  jitter: 5 parsecs\n"));
    assert!(p[0].contains("invalid duration"), "{p:?}");
    let p = problems(&format!("{MINIMAL}refresh:\n  auth_failure_delays: [1m, 500000000000y]\n"));
    assert!(p[0].starts_with("refresh.auth_failure_delays[1]: ") && p[0].contains("longer than 10 years"), "{p:?}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let yaml = "
magento:
  base_url: http://shop.example.com
  store_code: ../admin
output:
  dir: /tmp
refresh:
  before_expiry: 1m
  jitter: 2m
  min_backoff: 10s
  max_backoff: 5s
  max_auth_failures: 6
  auth_failure_pause: 10m
  lockout_reset: window
admin:
  listen: nowhere
log:
  level: \"[\"
customers:
  - name: alice
    username: alice@example.com
    password_env: A
  - name: alice
    username: ''
    password_file: /x
    password_env: Y
  - name: bad/name
    username: c
    file: ../escape
";
    let p = problems(yaml);
    let expect = [
        "magento.base_url: ",
        "magento.store_code: ",
        "refresh.jitter: must be less than",
        "refresh.max_backoff: must be at least",
        "refresh.max_auth_failures: must be between 1 and 5",
        "refresh.auth_failure_pause: must be longer",
        "admin.listen: ",
        "log.level: ",
        "customers[1].name: \"alice\" is used by another customer",
        "customers[1].username: must not be empty",
        "customers[1].password_file: give exactly one",
        "customers[2].name: ",
        "customers[2].password_file: one of password_file and password_env is required",
        "customers[2].file: ",
    ];
    for e in expect {
        assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
}

#[test]
fn one_entry_per_username_and_no_hidden_names() {
    let yaml = format!(
            "{MINIMAL}  - name: alice-de\n    username: Alice@Example.com\n    password_env: A\n    store_code: de\n  - name: .hidden\n    username: h\n    password_env: H\n"
        );
    let p = problems(&yaml);
    assert!(p[0].starts_with("customers[1].username: \"Alice@Example.com\" is customers[0]'s username too"), "{p:?}");
    assert!(p[1].starts_with("customers[2].name: \".hidden\" must not start with '.'"), "{p:?}");
    assert_eq!(p.len(), 2, "{p:?}");
}

#[test]
fn log_levels_are_levels_or_filters() {
    for ok in ["info", "DEBUG", "warn,reqwest=debug", "magento_token_sidecar=trace", "off"] {
        assert!(valid_log_level(ok), "{ok}");
    }
    for bad in ["", "inf", "verbose", "warning", "[", "info,chatty"] {
        assert!(!valid_log_level(bad), "{bad}");
    }
}

#[test]
fn plain_http_is_for_loopback_unless_allowed() {
    for ok in ["http://127.0.0.1:8080", "http://localhost", "http://[::1]:80"] {
        assert!(parse(&MINIMAL.replace("https://shop.example.com", ok), Checks::Static).is_ok(), "{ok}");
    }
    let insecure = MINIMAL.replace("https://shop.example.com", "http://shop.example.com");
    assert!(parse(&insecure, Checks::Static).is_err());
    let allowed = insecure.replace("  base_url:", "  allow_insecure_http: true\n  base_url:");
    assert!(parse(&allowed, Checks::Static).is_ok());
    assert!(problems(&MINIMAL.replace("https://shop.example.com", "ftp://x"))[0].contains("scheme"));
}

#[test]
fn environment_checks_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
            "magento:\n  base_url: https://x\n  ca_file: {d}/ca.pem\noutput:\n  dir: {d}/missing\ncustomers:\n  - name: a\n    username: a\n    password_file: {d}/nope\n",
            d = dir.path().display()
        );
    let p: Vec<String> = parse(&yaml, Checks::Environment).unwrap_err().iter().map(|p| p.to_string()).collect();
    assert_eq!(
        p,
        vec![
            "magento.ca_file: no such file".to_string(),
            format!("output.dir: {}/missing: no such directory", dir.path().display()),
            "customers[0].password_file: no such file".to_string(),
        ]
    );
}

#[test]
fn a_customers_own_format_overrides_the_global_one() {
    let yaml = MINIMAL.replace("  dir: /tmp", "  dir: /tmp\n  format: env").replace(
            "    password_env: ALICE_PASSWORD",
            "    password_env: ALICE_PASSWORD\n  - name: bob\n    username: b\n    password_env: B\n    format: header\n  - name: carol\n    username: c\n    password_env: C\n    format: json",
        );
    let c = parse(&yaml, Checks::Static).unwrap();
    let formats: Vec<Format> = c.customers.iter().map(|c| c.format).collect();
    assert_eq!(formats, [Format::Env, Format::Header, Format::Json]);
    // Without either: raw.
    assert_eq!(parse(MINIMAL, Checks::Static).unwrap().customers[0].format, Format::Raw);
    // An unknown format names the key and the formats there are.
    let p = problems(&MINIMAL.replace("    password_env: ALICE_PASSWORD", "    password_env: A\n    format: yaml"));
    assert!(p[0].starts_with("customers[0].format: unknown variant `yaml`"), "{p:?}");
    assert!(p[0].contains("`raw`, `json`, `header`, `env`"), "{p:?}");
    let p = problems(&MINIMAL.replace("  dir: /tmp", "  dir: /tmp\n  format: Header"));
    assert!(p[0].starts_with("output.format: unknown variant `Header`"), "{p:?}");
}

#[test]
fn the_index_is_a_plain_file_name_no_customer_writes() {
    let with_index = |name: &str| MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  index: {name:?}"));
    assert_eq!(dir(&parse(MINIMAL, Checks::Static).unwrap()).index, None);
    let c = parse(&with_index("tokens.json"), Checks::Static).unwrap();
    assert_eq!(dir(&c).index, Some(PathBuf::from("/tmp/tokens.json")));
    for (bad, why) in [
        ("", "output.index: must not be empty"),
        ("../tokens.json", "output.index: \"../tokens.json\" must be a plain file name inside output.dir"),
        ("/etc/tokens.json", "output.index: \"/etc/tokens.json\" must be a plain file name"),
        (".tokens.json", "output.index: \".tokens.json\" must not start with '.'"),
        ("alice", "output.index: \"alice\" is customers[0]'s token file too"),
    ] {
        let p = problems(&with_index(bad));
        assert_eq!(p.len(), 1, "{bad:?}: {p:?}");
        assert!(p[0].starts_with(why), "{bad:?}: {p:?}");
    }
    // A customer's own `file` is what it writes; its name then is free.
    let yaml = with_index("alice.token").replace("ALICE_PASSWORD", "ALICE_PASSWORD\n    file: alice.token");
    assert!(problems(&yaml)[0].starts_with("output.index: \"alice.token\" is customers[0]'s token file too"));
    let yaml = with_index("alice").replace("ALICE_PASSWORD", "ALICE_PASSWORD\n    file: alice.token");
    assert_eq!(dir(&parse(&yaml, Checks::Static).unwrap()).index, Some(PathBuf::from("/tmp/alice")));
}

#[test]
fn the_shipped_examples_are_valid() {
    let example = parse(include_str!("../../config/example.yaml"), Checks::Static).unwrap();
    assert_eq!(example.customers.len(), 2);
    let Endpoint::Rest { token, .. } = example.customers[0].endpoint() else { panic!("the example is REST") };
    assert_eq!(token.as_str(), "https://shop.de/rest/de/V1/integration/customer/token");
    assert_eq!(dir(&example).path(&example.customers[0]), PathBuf::from("/var/run/magento-tokens/alice.token"));
    assert_eq!((example.customers[0].format, example.customers[1].format), (Format::Env, Format::Raw));
    assert_eq!(dir(&example).index, Some(PathBuf::from("/var/run/magento-tokens/tokens.json")));
    assert_eq!(example.customers[1].password, Some(PasswordSource::Env("ERP_PASSWORD".into())));
    let demo =
        include_str!("../../config/demo.yaml").replace("{base_url}", "http://127.0.0.1:1").replace("{dir}", "/tmp");
    for (api, expected) in [("rest", Api::Rest), ("graphql", Api::GraphQl { path: "/graphql".into() })] {
        let c = parse(&demo.replace("{api}", api), Checks::Static).unwrap();
        assert_eq!(c.customers.len(), 2);
        assert_eq!(c.customers[0].api, expected);
    }
}

#[test]
fn password_files_lose_one_trailing_newline_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    for (content, expect) in [
        ("s3cret\n", "s3cret"),
        ("s3cret", "s3cret"),
        ("s3cret\n\n", "s3cret\n"),
        (" sp ace \n", " sp ace "),
        ("crlf\r\n", "crlf\r"),
    ] {
        std::fs::write(&file, content).unwrap();
        assert_eq!(PasswordSource::File(file.clone()).read().unwrap().expose(), expect);
    }
    std::fs::write(&file, "\n").unwrap();
    assert!(matches!(PasswordSource::File(file.clone()).read(), Err(PasswordError::EmptyFile(_))));
    // Up to 4 KiB, through symbolic links (Kubernetes' `..data`).
    std::fs::write(&file, "x".repeat(MAX_PASSWORD_FILE)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    assert_eq!(PasswordSource::File(link).read().unwrap().expose().len(), MAX_PASSWORD_FILE);
    std::fs::write(&file, "x".repeat(MAX_PASSWORD_FILE + 1)).unwrap();
    let e = PasswordSource::File(file.clone()).read().unwrap_err();
    assert_eq!(e.to_string(), format!("password_file {} is larger than 4 KiB, the most it may hold", file.display()));
}

/// `MINIMAL` without its customer's password, with `auth` and more lines for the customer.
fn without_password(auth: &str, customer: &str) -> String {
    MINIMAL.replace("    password_env: ALICE_PASSWORD\n", customer) + auth
}

const ADMIN: &str = "auth:\n  method: login_as_customer\n  admin:\n    username: robot\n    password_env: ADMIN_PW\n";
const IMS: &str = "auth:\n  method: cloud_service_otp\n  ims:\n    client_id: c1\n    client_secret_env: IMS_SECRET\n    org_id: O@AdobeOrg\n";

#[test]
fn login_as_customer_takes_an_admin_and_no_customer_password() {
    let c = parse(&without_password(ADMIN, ""), Checks::Static).unwrap();
    let Auth::LoginAsCustomer(admin) = &c.auth else { panic!("{:?}", c.auth) };
    assert_eq!(admin.username, "robot");
    assert_eq!(admin.password, PasswordSource::Env("ADMIN_PW".into()));
    assert_eq!(admin.route().as_str(), "https://shop.example.com/rest/V1/integration/admin/token");
    assert_eq!(c.customers[0].password, None);
    assert_eq!(c.customers[0].graphql_url().as_str(), "https://shop.example.com/graphql");
    let totp = without_password(&format!("{ADMIN}    totp_secret_file: /etc/totp\n"), "");
    let Auth::LoginAsCustomer(admin) = parse(&totp, Checks::Static).unwrap().auth else { panic!() };
    assert_eq!(admin.route().as_str(), "https://shop.example.com/rest/V1/tfa/provider/google/authenticate");
    // The default stays the customers' passwords.
    assert_eq!(parse(MINIMAL, Checks::Static).unwrap().auth, Auth::Password);
}

#[test]
fn cloud_service_otp_takes_an_ims_credential_and_customer_ids() {
    let cloud = "magento:\n  base_url: https://na1.api.commerce.adobe.com/T3nant\n  cloud_service: true\n";
    let yaml = without_password(IMS, "    customer_id: 42\n")
        .replace("magento:\n  base_url: https://shop.example.com\n", cloud);
    let c = parse(&yaml, Checks::Static).unwrap();
    let Auth::CloudServiceOtp(ims) = &c.auth else { panic!("{:?}", c.auth) };
    assert_eq!(ims.token_url.as_str(), "https://ims-na1.adobelogin.com/ims/token/v3");
    assert_eq!(ims.scopes, auth::DEFAULT_IMS_SCOPES.map(String::from));
    assert_eq!((ims.client_id.as_str(), ims.org_id.as_str()), ("c1", "O@AdobeOrg"));
    assert_eq!(c.customers[0].customer_id, Some(42));
    assert_eq!(
        c.customers[0].rest_url("V1/customer/42/otp").as_str(),
        "https://na1.api.commerce.adobe.com/T3nant/V1/customer/42/otp"
    );
}

#[test]
fn check_refuses_an_auth_that_cannot_work_naming_the_key() {
    // A customer password with a method that never sends one.
    let p = problems(&MINIMAL.replace("customers:", &format!("{ADMIN}customers:")));
    assert_eq!(p, ["customers[0].password_env: auth.method login_as_customer obtains this customer's tokens without its password: remove password_env"]);
    // No customer id for the one-time codes, and not on the cloud service.
    let p = problems(&without_password(IMS, ""));
    assert!(
        p.iter().any(|p| p.starts_with("auth.method: cloud_service_otp is Adobe Commerce as a Cloud Service's way")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|p| p.starts_with("customers[0].customer_id: is required with auth.method cloud_service_otp")),
        "{p:?}"
    );
    // An admin token where there is none.
    let cloud = without_password(ADMIN, "").replace(
        "  base_url: https://shop.example.com\n",
        "  base_url: https://na1.api.commerce.adobe.com/T\n  cloud_service: true\n",
    );
    assert!(problems(&cloud)[0].starts_with("auth.method: login_as_customer needs an admin token"));
    // Each method's own section, and nothing of the other's.
    assert_eq!(
        problems(&without_password("auth:\n  method: login_as_customer\n", "")),
        ["auth.admin: is required with auth.method login_as_customer: the admin user's username and password_file (or password_env)"]
    );
    let both =
        without_password(&format!("{ADMIN}  ims:\n    client_id: c\n    client_secret_env: S\n    org_id: O\n"), "");
    assert_eq!(
        problems(&both),
        ["auth.ims: is used only with auth.method cloud_service_otp, not login_as_customer: remove it"]
    );
    let no_secret = without_password(&ADMIN.replace("    password_env: ADMIN_PW\n", ""), "");
    assert_eq!(
        problems(&no_secret),
        ["auth.admin.password_file: one of auth.admin.password_file and auth.admin.password_env is required"]
    );
    let p = problems(&MINIMAL.replace("customers:", "auth:\n  method: secret_handshake\ncustomers:"));
    assert!(p[0].contains("unknown variant `secret_handshake`"), "{p:?}");
    // Plain http to IMS only on loopback, and a scope list of words.
    let ims = IMS.to_owned() + "    token_url: http://ims.example.com/token\n    scopes: [\"a b\"]\n";
    let p = problems(&without_password(&ims, "    customer_id: 1\n").replace(
        "  base_url: https://shop.example.com\n",
        "  base_url: https://na1.api.commerce.adobe.com/T\n  cloud_service: true\n",
    ));
    assert!(
        p.iter().any(|p| p.starts_with("auth.ims.token_url: \"http://ims.example.com/token\" uses plain http")),
        "{p:?}"
    );
    assert!(p.iter().any(|p| p.starts_with("auth.ims.scopes:")), "{p:?}");
}

#[test]
fn the_issuers_secrets_are_read_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let (password, totp) = (dir.path().join("pw"), dir.path().join("totp"));
    let yaml = without_password(
        &format!(
            "auth:\n  method: login_as_customer\n  admin:\n    username: robot\n    password_file: {}\n    totp_secret_file: {}\n",
            password.display(),
            totp.display()
        ),
        "",
    )
    .replace("  dir: /tmp\n", &format!("  dir: {}\n", dir.path().display()));
    let p: Vec<String> = parse(&yaml, Checks::Environment).unwrap_err().iter().map(|p| p.to_string()).collect();
    assert_eq!(
        p,
        [
            "auth.admin.password_file: no such file".to_owned(),
            format!("auth.admin.totp_secret_file: {}: no such file", totp.display())
        ]
    );
    std::fs::write(&password, "Adm1n-Pw\n").unwrap();
    std::fs::write(&totp, "not base32 at all!\n").unwrap();
    let p: Vec<String> = parse(&yaml, Checks::Environment).unwrap_err().iter().map(|p| p.to_string()).collect();
    assert!(p.len() == 1 && p[0].contains("is not a base32 secret") && !p[0].contains("at all"), "{p:?}");
    std::fs::write(&totp, "JBSWY3DPEHPK3PXP\n").unwrap();
    assert!(parse(&yaml, Checks::Environment).is_ok());
}

#[test]
fn a_customer_may_have_a_secret_of_its_own_with_output_kubernetes_only() {
    let kube = MINIMAL.replace("  dir: /tmp\n", "  kubernetes:\n    secret: magento-tokens\n");
    let own = format!("{kube}    secret: shop-a-tokens\n");
    assert_eq!(parse(&own, Checks::Static).unwrap().customers[0].secret.as_deref(), Some("shop-a-tokens"));
    assert_eq!(parse(&kube, Checks::Static).unwrap().customers[0].secret, None, "the default Secret");
    let p = problems(&format!("{MINIMAL}    secret: shop-a-tokens\n"));
    assert_eq!(p, ["customers[0].secret: applies only to output.kubernetes: with output.dir every token is a file"]);
    let p = problems(&format!("{kube}    secret: Shop_A\n"));
    assert!(p[0].starts_with("customers[0].secret: \"Shop_A\" is not a Kubernetes object name"), "{p:?}");
    // Each Secret's customers must fit in it: 600 json tokens do not fit one, they fit two.
    let mut many = kube.replace(
        "customers:\n  - name: alice\n    username: alice@example.com\n    password_env: ALICE_PASSWORD\n",
        "  format: json\ncustomers:\n",
    );
    for i in 0..600 {
        many.push_str(&format!("  - name: c{i}\n    username: c{i}@x.com\n    password_env: P\n"));
    }
    let p = problems(&many);
    assert!(p.len() == 1 && p[0].contains("would not fit in the Secret \"magento-tokens\""), "{p:?}");
    let mut split = String::new();
    for (i, line) in many.lines().enumerate() {
        split.push_str(line);
        split.push('\n');
        if line.starts_with("    password_env: P") && i % 2 == 0 {
            split.push_str("    secret: more-tokens\n");
        }
    }
    assert!(parse(&split, Checks::Static).is_ok(), "{:?}", problems(&split));
}
