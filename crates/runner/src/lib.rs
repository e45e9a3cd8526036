//! The runtime side of CNI (what libcni does for podman and containerd).
