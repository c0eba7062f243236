"""KVM/TCG guests for the test suite: real kernels, systemd and cloud-init booting the
project's user-data, on networks inside a namespace the tests make themselves."""
