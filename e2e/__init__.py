"""End-to-end tests on the Kubernetes test bed (`make e2e`); the harness is `e2e.bed`."""
