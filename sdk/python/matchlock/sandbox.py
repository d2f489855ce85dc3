"""The sandbox builder: what to boot and how."""

from typing import Any, Dict, List, Optional


class Sandbox:
    """Describes a sandbox to launch. Methods return ``self`` so they chain::

        Sandbox("alpine:latest").with_cpus(2).allow_host("pypi.org")
    """

    def __init__(self, image: str) -> None:
        if not image:
            raise ValueError("Sandbox: an image is required, e.g. Sandbox('alpine:latest')")
        self.image = image
        self.cpus: Optional[int] = None
        self.memory_mib: Optional[int] = None
        self.disk_size_mib: Optional[int] = None
        self.env: Dict[str, str] = {}
        self.workdir: Optional[str] = None
        self.user: Optional[str] = None
        self.hostname: Optional[str] = None
        self.allow_hosts: List[str] = []
        self.allow_private_targets: List[str] = []
        self.no_network = False
        self.secrets: List[Dict[str, Any]] = []
        self.mounts: List[Dict[str, Any]] = []

    def allow_host(self, *hosts: str) -> "Sandbox":
        """Let the sandbox reach these host patterns; egress is otherwise sealed."""
        self.allow_hosts.extend(hosts)
        return self

    def allow_private(self, *targets: str) -> "Sandbox":
        """Let the sandbox reach these private addresses, CIDRs or names."""
        self.allow_private_targets.extend(targets)
        return self

    def without_network(self) -> "Sandbox":
        """Give the sandbox no network interface at all."""
        self.no_network = True
        return self

    def add_secret(self, name: str, value: str, *hosts: str) -> "Sandbox":
        """Make ``value`` usable on HTTPS requests to ``hosts`` without it
        entering the VM: the guest's ``$name`` holds a placeholder."""
        self.secrets.append({"name": name, "value": value, "hosts": list(hosts)})
        return self

    def with_env(self, key: str, value: str) -> "Sandbox":
        """Set an environment variable for every command."""
        self.env[key] = value
        return self

    def with_cpus(self, n: int) -> "Sandbox":
        self.cpus = n
        return self

    def with_memory(self, mib: int) -> "Sandbox":
        """Guest memory in MiB (default 512)."""
        self.memory_mib = mib
        return self

    def with_disk_size(self, mib: int) -> "Sandbox":
        """Size of the writable layer in MiB (default 4096)."""
        self.disk_size_mib = mib
        return self

    def with_workdir(self, path: str) -> "Sandbox":
        self.workdir = path
        return self

    def with_user(self, user: str) -> "Sandbox":
        self.user = user
        return self

    def with_hostname(self, name: str) -> "Sandbox":
        self.hostname = name
        return self

    def mount(self, guest_path: str, host_path: Optional[str] = None, *, volume: Optional[str] = None,
              mode: Optional[str] = None, readonly: bool = False, owner: Optional[str] = None) -> "Sandbox":
        """Mount a host directory (``host_path``) or a named volume
        (``volume``) at ``guest_path``. ``mode`` for a directory: "rw"
        (default: guest writes reach the host), "ro", or "overlay" (guest
        writes go to a copy-on-write layer; the host is untouched).
        ``owner`` is who the files appear owned by in the guest."""
        m: Dict[str, Any] = {"guest_path": guest_path}
        if host_path:
            m["host_path"] = host_path
        if volume:
            m["volume"] = volume
        if mode:
            m["mode"] = mode
        if readonly:
            m["readonly"] = True
        if owner:
            m["owner"] = owner
        self.mounts.append(m)
        return self

    def to_params(self) -> Dict[str, Any]:
        """The params of the protocol's create method."""
        p: Dict[str, Any] = {"image": self.image}
        for key, val in (("cpus", self.cpus), ("memory_mib", self.memory_mib),
                         ("disk_size_mib", self.disk_size_mib), ("workdir", self.workdir),
                         ("user", self.user), ("hostname", self.hostname)):
            if val is not None:
                p[key] = val
        if self.env:
            p["env"] = dict(self.env)
        if self.allow_hosts:
            p["allow_hosts"] = list(self.allow_hosts)
        if self.allow_private_targets:
            p["allow_private"] = list(self.allow_private_targets)
        if self.no_network:
            p["no_network"] = True
        if self.secrets:
            p["secrets"] = [dict(s) for s in self.secrets]
        if self.mounts:
            p["mounts"] = [dict(m) for m in self.mounts]
        return p

    def __repr__(self) -> str:
        return f"Sandbox({self.image!r})"
