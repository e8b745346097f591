// Pins CoreDNS, the test cluster's DNS, its own module so its dependencies do
// not move the Kubernetes binaries'.
module kloak.test/cluster/coredns

go 1.25.0

require github.com/coredns/coredns v1.15.0
