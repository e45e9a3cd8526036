//! Golden renderings of one dual-stack ADD result in every spec version
//! (checklist C5, 1.8). Compared as JSON values, so key order and spacing
//! do not matter.
use serde_json::Value;
use tern_cni::{CniResult, Dns, Interface, IpConfig, Route, Version};

fn dual_stack() -> CniResult {
    CniResult {
        interfaces: vec![
            Interface {
                name: "veth1234".into(),
                mac: "aa:bb:cc:00:00:01".into(),
                mtu: Some(1400),
                ..Default::default()
            },
            Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:00:00:02".into(),
                mtu: Some(1400),
                sandbox: "/run/netns/ctr".into(),
                socket_path: "/run/vhost.sock".into(),
                pci_id: "0000:04:00.5".into(),
            },
        ],
        ips: vec![
            IpConfig {
                address: "10.9.0.2/29".parse().unwrap(),
                gateway: Some("10.9.0.1".parse().unwrap()),
                interface: Some(1),
            },
            IpConfig {
                address: "fd00:9::2/126".parse().unwrap(),
                gateway: Some("fd00:9::1".parse().unwrap()),
                interface: Some(1),
            },
        ],
        routes: vec![
            Route { mtu: Some(1300), scope: Some(0), ..Route::new("0.0.0.0/0".parse().unwrap(), None) },
            Route {
                table: Some(100),
                priority: Some(5),
                advmss: Some(1200),
                ..Route::new("::/0".parse().unwrap(), Some("fd00:9::1".parse().unwrap()))
            },
            Route::new("10.99.0.0/16".parse().unwrap(), Some("10.9.0.6".parse().unwrap())),
        ],
        dns: Dns {
            nameservers: vec!["10.9.0.53".into(), "fd00:9::53".into()],
            domain: "cluster.local".into(),
            search: vec!["svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        },
    }
}

const DNS: &str = r#""dns":{"nameservers":["10.9.0.53","fd00:9::53"],"domain":"cluster.local","search":["svc.cluster.local"],"options":["ndots:5"]}"#;

#[rustfmt::skip]
const GOLDEN: &[(Version, &str)] = &[
    (Version::V1_1_0, r#"{"cniVersion":"1.1.0",
        "interfaces":[{"name":"veth1234","mac":"aa:bb:cc:00:00:01","mtu":1400},
                      {"name":"eth0","mac":"aa:bb:cc:00:00:02","mtu":1400,"sandbox":"/run/netns/ctr","socketPath":"/run/vhost.sock","pciID":"0000:04:00.5"}],
        "ips":[{"address":"10.9.0.2/29","gateway":"10.9.0.1","interface":1},{"address":"fd00:9::2/126","gateway":"fd00:9::1","interface":1}],
        "routes":[{"dst":"0.0.0.0/0","mtu":1300,"scope":0},{"dst":"::/0","gw":"fd00:9::1","advmss":1200,"priority":5,"table":100},{"dst":"10.99.0.0/16","gw":"10.9.0.6"}],
        DNS}"#),
    (Version::V1_0_0, r#"{"cniVersion":"1.0.0",
        "interfaces":[{"name":"veth1234","mac":"aa:bb:cc:00:00:01"},{"name":"eth0","mac":"aa:bb:cc:00:00:02","sandbox":"/run/netns/ctr"}],
        "ips":[{"address":"10.9.0.2/29","gateway":"10.9.0.1","interface":1},{"address":"fd00:9::2/126","gateway":"fd00:9::1","interface":1}],
        "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0","gw":"fd00:9::1"},{"dst":"10.99.0.0/16","gw":"10.9.0.6"}],
        DNS}"#),
    (Version::V0_4_0, r#"{"cniVersion":"0.4.0",
        "interfaces":[{"name":"veth1234","mac":"aa:bb:cc:00:00:01"},{"name":"eth0","mac":"aa:bb:cc:00:00:02","sandbox":"/run/netns/ctr"}],
        "ips":[{"version":"4","address":"10.9.0.2/29","gateway":"10.9.0.1","interface":1},{"version":"6","address":"fd00:9::2/126","gateway":"fd00:9::1","interface":1}],
        "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0","gw":"fd00:9::1"},{"dst":"10.99.0.0/16","gw":"10.9.0.6"}],
        DNS}"#),
    (Version::V0_3_1, r#"{"cniVersion":"0.3.1",
        "interfaces":[{"name":"veth1234","mac":"aa:bb:cc:00:00:01"},{"name":"eth0","mac":"aa:bb:cc:00:00:02","sandbox":"/run/netns/ctr"}],
        "ips":[{"version":"4","address":"10.9.0.2/29","gateway":"10.9.0.1","interface":1},{"version":"6","address":"fd00:9::2/126","gateway":"fd00:9::1","interface":1}],
        "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0","gw":"fd00:9::1"},{"dst":"10.99.0.0/16","gw":"10.9.0.6"}],
        DNS}"#),
    (Version::V0_3_0, r#"{"cniVersion":"0.3.0",
        "interfaces":[{"name":"veth1234","mac":"aa:bb:cc:00:00:01"},{"name":"eth0","mac":"aa:bb:cc:00:00:02","sandbox":"/run/netns/ctr"}],
        "ips":[{"version":"4","address":"10.9.0.2/29","gateway":"10.9.0.1","interface":1},{"version":"6","address":"fd00:9::2/126","gateway":"fd00:9::1","interface":1}],
        "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0","gw":"fd00:9::1"},{"dst":"10.99.0.0/16","gw":"10.9.0.6"}],
        DNS}"#),
    (Version::V0_2_0, r#"{"cniVersion":"0.2.0",
        "ip4":{"ip":"10.9.0.2/29","gateway":"10.9.0.1","routes":[{"dst":"0.0.0.0/0"},{"dst":"10.99.0.0/16","gw":"10.9.0.6"}]},
        "ip6":{"ip":"fd00:9::2/126","gateway":"fd00:9::1","routes":[{"dst":"::/0","gw":"fd00:9::1"}]},
        DNS}"#),
    (Version::V0_1_0, r#"{"cniVersion":"0.1.0",
        "ip4":{"ip":"10.9.0.2/29","gateway":"10.9.0.1","routes":[{"dst":"0.0.0.0/0"},{"dst":"10.99.0.0/16","gw":"10.9.0.6"}]},
        "ip6":{"ip":"fd00:9::2/126","gateway":"fd00:9::1","routes":[{"dst":"::/0","gw":"fd00:9::1"}]},
        DNS}"#),
];

#[test]
fn dual_stack_result_in_every_version() {
    assert_eq!(GOLDEN.len(), Version::ALL.len());
    let r = dual_stack();
    for &(version, golden) in GOLDEN {
        let want: Value = serde_json::from_str(&golden.replace("DNS", DNS)).unwrap();
        let got = r.to_value(version).unwrap();
        assert_eq!(got, want, "version {version}");
        // The printed string is the same value.
        let printed: Value = serde_json::from_str(&r.to_json_string(version).unwrap()).unwrap();
        assert_eq!(printed, want, "version {version} (string)");
        // And parses back to the same result, minus what the version cannot carry.
        let back = CniResult::from_value(&got, Version::V0_1_0).unwrap();
        assert_eq!(back.to_value(version).unwrap(), want, "version {version} (round trip)");
        if version == Version::LATEST {
            assert_eq!(back, r);
        }
    }
}
