//! Configuration of the `tern` plugin. Keys follow the reference bridge
//! plugin so migrating users change only `type`.
use serde::Deserialize;
use tern_cni::CniError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pods on a Linux bridge, one L2 segment per node.
    #[default]
    Bridge,
    /// An L3 veth per pod, no bridge: /32 and /128 addresses, host routes.
    Routed,
}

/// How packets between two pods of the node travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dataplane {
    /// Through the node's kernel: veth, then routing or bridging, netfilter.
    #[default]
    Kernel,
    /// tern's eBPF fast path (crates/bpf): packets between two local pods
    /// of this dataplane go from one veth straight into the other pod,
    /// skipping the node's forwarding and netfilter. Anything else still
    /// takes the kernel path.
    Ebpf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodConf {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub dataplane: Dataplane,
    #[serde(default = "default_bridge")]
    pub bridge: String,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub is_gateway: bool,
    #[serde(default)]
    pub is_default_gateway: bool,
    #[serde(default)]
    pub force_address: bool,
    #[serde(default)]
    pub ip_masq: bool,
    #[serde(default)]
    pub hairpin_mode: bool,
    #[serde(default)]
    pub promisc_mode: bool,
    #[serde(default)]
    pub macspoofchk: bool,
    #[serde(default)]
    pub enabledad: bool,
    /// Reference bridge keys that need 802.1Q support, which this kernel lacks.
    #[serde(default)]
    pub vlan: Option<u32>,
    #[serde(default)]
    pub vlan_trunk: Option<serde_json::Value>,
}

fn default_bridge() -> String {
    "cni0".to_string()
}

impl PodConf {
    pub fn validate(mut self) -> Result<PodConf, CniError> {
        if self.is_default_gateway {
            self.is_gateway = true;
        }
        if self.hairpin_mode && self.promisc_mode {
            return Err(CniError::invalid_config(
                "cannot set hairpin mode and promiscuous mode at the same time (hairpinMode, promiscMode)",
            ));
        }
        if let Some(mtu) = self.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(CniError::invalid_config(format!("invalid mtu {mtu}: must be between 68 and 65535 (mtu)")));
            }
        }
        if self.vlan.is_some_and(|v| v != 0) || self.vlan_trunk.is_some() {
            return Err(CniError::new(
                tern_cni::Code::UnsupportedField,
                "unsupported field: vlan/vlanTrunk need 802.1Q support (vlan)",
            ));
        }
        if self.mode == Mode::Bridge {
            tern_cni::validate::interface_name(&self.bridge)
                .map_err(|_| CniError::invalid_config(format!("invalid bridge name {:?} (bridge)", self.bridge)))?;
        }
        Ok(self)
    }
}
