//! Configurations of a large site, for the scale tests and the control-plane benchmark:
//! many services behind the same real servers (as web farms run them: every VIP served
//! by the whole farm), each checked by TCP.

use std::net::IpAddr;

/// The address of real server `b` (0-based): 10.1.0.1, ..., 10.1.0.250, 10.1.1.1, ...
pub fn real_server(b: usize) -> IpAddr {
    IpAddr::from([10, 1, (b / 250) as u8, (1 + b % 250) as u8])
}

/// YAML for `services` services of `backends` real servers each (the same ones), with
/// rings of `ring` slots and a `director.ring_slots` that holds them all.
pub fn large_site(services: usize, backends: usize, ring: u32) -> String {
    let mut y = format!(
        "director:\n  interfaces: [eth0]\n  ring_slots: {}\nservices:\n",
        2 * ring as usize * services
    );
    for i in 0..services {
        y.push_str(&format!(
            "  - name: s{i}\n    match: {{ vip: 198.51.100.{}, port: {} }}\n    ring_size: {ring}\n    check: {{ type: tcp }}\n    backends:\n",
            1 + i % 250,
            1000 + i / 250
        ));
        for b in 0..backends {
            y.push_str(&format!("      - {{ address: {}, weight: 100 }}\n", real_server(b)));
        }
    }
    y
}
