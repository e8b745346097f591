// Pins helm for the cluster tests, its own module so its dependencies do not
// move the Kubernetes binaries'.
module kloak.test/cluster/helm

go 1.25.0

require helm.sh/helm/v3 v3.22.0
