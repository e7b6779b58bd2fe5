//! The one rule for workers' ports, used by the CLI (`--worker NAME=DIR@PORT`) and by the account
//! controller (a worker keeps its port across releases): a worker keeps the port it asks for
//! unless an earlier worker holds it already; every other worker takes the lowest free port from
//! [`FIRST_PORT`], in the order given.

use std::collections::BTreeSet;

/// The first port handed out when a worker asks for none.
pub const FIRST_PORT: u16 = 8080;

/// The port of the platform's health socket in every image (see `image::workerd_config`): no
/// worker may have it.
pub const HEALTH_PORT: u16 = 8079;

/// Ports for `requests` (a name and the port it asks for), in the same order.
pub fn assign_ports(requests: &[(&str, Option<u16>)]) -> Result<Vec<u16>, String> {
    if let Some((name, _)) = requests.iter().find(|(_, port)| *port == Some(HEALTH_PORT)) {
        return Err(format!(
            "worker {name:?} asks for port {HEALTH_PORT}, which every image keeps for its health probe"
        ));
    }
    let mut taken = BTreeSet::new();
    let kept: Vec<Option<u16>> =
        requests.iter().map(|(_, port)| port.filter(|p| *p != 0 && taken.insert(*p))).collect();
    let mut next = FIRST_PORT;
    let mut ports = Vec::with_capacity(requests.len());
    for ((name, _), kept) in requests.iter().zip(kept) {
        let port = match kept {
            Some(port) => port,
            None => {
                while taken.contains(&next) {
                    next = next
                        .checked_add(1)
                        .ok_or_else(|| format!("no free port above {FIRST_PORT} for worker {name:?}"))?;
                }
                taken.insert(next);
                next
            }
        };
        ports.push(port);
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_count_up_from_8080_around_requested_ones() {
        let ports = assign_ports(&[("a", None), ("b", Some(8081)), ("c", None), ("d", None)]).unwrap();
        assert_eq!(ports, [8080, 8081, 8082, 8083]);
        assert_eq!(assign_ports(&[("a", Some(8080)), ("b", None)]).unwrap(), [8080, 8081]);
    }

    #[test]
    fn a_port_held_by_an_earlier_worker_is_given_up() {
        assert_eq!(
            assign_ports(&[("a", Some(9000)), ("b", Some(9000)), ("c", None)]).unwrap(),
            [9000, 8080, 8081]
        );
    }

    #[test]
    fn kept_ports_leave_gaps_that_new_workers_fill() {
        assert_eq!(
            assign_ports(&[("a", Some(8081)), ("n", None), ("z", Some(8083))]).unwrap(),
            [8081, 8080, 8083]
        );
    }
}
