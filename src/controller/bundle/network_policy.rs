//! The account's NetworkPolicy, pure: its workers' pods take traffic from anything but another
//! account's workers, and reach the internet and the cluster's DNS but not the cluster's private
//! ranges (other pods, nodes, the cloud's metadata service).
//!
//! Kubernetes matches pod-to-pod traffic by selectors, not by address, so ingress is allowed from
//! (a) pods of this account, (b) pods that are no account's worker (ingress controllers, gateways,
//! other workloads) in any namespace, and (c) addresses outside the private ranges (clients
//! through a load balancer that keeps their address). Another account's workers match none.
//!
//! The kubelet's probes of the health socket come from the pod's own node, whose address is in a
//! private range and so matches no rule here. They still reach it: a NetworkPolicy cannot block a
//! pod's resident node (Kubernetes documents this among what network policies cannot do, and
//! every NetworkPolicy implementation lets the local node through), so no rule for them is needed
//! and none is written; one admitting the nodes' ranges would let every node, and whatever runs on
//! their host network, in. The rules name no ports, so no port of an admitted peer is cut off.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::plan::account_name;
use super::workload::{meta, selector_labels, stamp};
use crate::crd::{WorkerBundle, ACCOUNT_LABEL};

/// Private, link-local and shared ranges: pods, Services and nodes live here on every cluster,
/// and so do cloud metadata services (169.254.169.254, fd00:ec2::254).
const PRIVATE_V4: [&str; 5] =
    ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"];
const PRIVATE_V6: [&str; 2] = ["fc00::/7", "fe80::/10"];

fn outside_private_ranges() -> Vec<NetworkPolicyPeer> {
    let block = |cidr: &str, except: &[&str]| NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.into(),
            except: Some(except.iter().map(|c| (*c).to_owned()).collect()),
        }),
        ..NetworkPolicyPeer::default()
    };
    vec![block("0.0.0.0/0", &PRIVATE_V4), block("::/0", &PRIVATE_V6)]
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
}

fn any_namespace() -> Option<LabelSelector> {
    Some(LabelSelector::default())
}

/// The NetworkPolicy of the bundle's pods (named like its Deployment, owned by the bundle).
pub fn network_policy(bundle: &WorkerBundle) -> NetworkPolicy {
    let account = account_name(bundle);
    let same_account = NetworkPolicyPeer {
        namespace_selector: any_namespace(),
        pod_selector: Some(LabelSelector {
            match_labels: labels(&[(ACCOUNT_LABEL, &account)]),
            ..Default::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let not_a_worker = NetworkPolicyPeer {
        namespace_selector: any_namespace(),
        pod_selector: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: ACCOUNT_LABEL.into(),
                operator: "DoesNotExist".into(),
                values: None,
            }]),
            ..Default::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let mut from = vec![same_account, not_a_worker];
    from.extend(outside_private_ranges());

    let dns = NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: any_namespace(),
            pod_selector: Some(LabelSelector {
                match_labels: labels(&[("k8s-app", "kube-dns")]),
                ..Default::default()
            }),
            ..NetworkPolicyPeer::default()
        }]),
        ports: Some(
            ["UDP", "TCP"]
                .into_iter()
                .map(|protocol| NetworkPolicyPort {
                    port: Some(IntOrString::Int(53)),
                    protocol: Some(protocol.into()),
                    end_port: None,
                })
                .collect(),
        ),
    };
    let internet = NetworkPolicyEgressRule { to: Some(outside_private_ranges()), ports: None };

    let mut object = NetworkPolicy {
        metadata: meta(bundle),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(bundle)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule { from: Some(from), ports: None }]),
            egress: Some(vec![dns, internet]),
        }),
    };
    stamp(&mut object.metadata, &object.spec);
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WorkerBundleSpec;

    fn bundle(account: &str) -> WorkerBundle {
        let mut bundle = WorkerBundle::new(
            &format!("workers-{account}"),
            WorkerBundleSpec {
                deployment_name: format!("workers-{account}"),
                repository: None,
                base_image: None,
                workers: Vec::new(),
                pod_template: None,
            },
        );
        bundle.metadata.namespace = Some("workers".into());
        bundle.metadata.labels = Some([(ACCOUNT_LABEL.to_owned(), account.to_owned())].into());
        bundle
    }

    /// Whether a pod with `pod_labels` may connect, judged by the policy's ingress peers the way
    /// a NetworkPolicy implementation matches selectors.
    fn admits(policy: &NetworkPolicy, pod_labels: &BTreeMap<String, String>) -> bool {
        let rules = policy.spec.as_ref().unwrap().ingress.as_ref().unwrap();
        rules.iter().flat_map(|r| r.from.iter().flatten()).any(|peer| {
            let Some(selector) = &peer.pod_selector else { return false };
            let labels_match =
                selector.match_labels.iter().flatten().all(|(k, v)| pod_labels.get(k) == Some(v));
            let expressions_match =
                selector.match_expressions.iter().flatten().all(|e| match e.operator.as_str() {
                    "DoesNotExist" => !pod_labels.contains_key(&e.key),
                    other => panic!("unexpected operator {other}"),
                });
            labels_match && expressions_match
        })
    }

    #[test]
    fn another_accounts_workers_are_denied_everyone_else_admitted() {
        let policy = network_policy(&bundle("1234"));
        let pod = |pairs: &[(&str, &str)]| labels(pairs).unwrap();
        assert!(admits(&policy, &pod(&[(ACCOUNT_LABEL, "1234"), ("app", "x")])));
        assert!(!admits(&policy, &pod(&[(ACCOUNT_LABEL, "5678")])), "another account's worker");
        assert!(
            admits(&policy, &pod(&[("app.kubernetes.io/name", "ingress-nginx")])),
            "an ingress controller"
        );
        let spec = policy.spec.as_ref().unwrap();
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_owned(), "Egress".to_owned()][..]));
        assert_eq!(spec.pod_selector.as_ref().unwrap().match_labels, Some(selector_labels(&bundle("1234"))));
    }

    #[test]
    fn ingress_names_no_ports_so_admitted_peers_reach_the_health_socket_too() {
        let policy = network_policy(&bundle("1234"));
        let rules = policy.spec.unwrap().ingress.unwrap();
        assert!(rules.iter().all(|r| r.ports.is_none()), "{rules:?}");
    }

    #[test]
    fn egress_reaches_dns_and_the_internet_but_no_private_range() {
        let policy = network_policy(&bundle("1234"));
        let egress = policy.spec.as_ref().unwrap().egress.clone().unwrap();
        let blocks: Vec<&IPBlock> =
            egress.iter().flat_map(|r| r.to.iter().flatten()).filter_map(|p| p.ip_block.as_ref()).collect();
        assert_eq!(blocks.len(), 2);
        for block in blocks {
            let except = block.except.clone().unwrap();
            assert!(except.contains(&"10.0.0.0/8".to_owned()) || except.contains(&"fc00::/7".to_owned()));
        }
        let v4 = egress[1].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap();
        assert!(v4.except.as_ref().unwrap().contains(&"169.254.0.0/16".to_owned()), "the metadata service");
        let dns_ports: Vec<_> =
            egress[0].ports.iter().flatten().map(|p| p.protocol.clone().unwrap()).collect();
        assert_eq!(dns_ports, ["UDP", "TCP"]);
    }
}
