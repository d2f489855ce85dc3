package sdk

import (
	"context"
	"fmt"
)

// Builder describes a sandbox to launch. Its methods change it and return
// it, so that they chain:
//
//	sdk.New("alpine:latest").WithCPUs(2).WithMemory(1024).AllowHost("pypi.org")
type Builder struct {
	p createParams
}

type createParams struct {
	Image        string            `json:"image"`
	CPUs         int               `json:"cpus,omitempty"`
	MemoryMiB    int               `json:"memory_mib,omitempty"`
	DiskSizeMiB  int               `json:"disk_size_mib,omitempty"`
	Env          map[string]string `json:"env,omitempty"`
	Workdir      string            `json:"workdir,omitempty"`
	User         string            `json:"user,omitempty"`
	Hostname     string            `json:"hostname,omitempty"`
	AllowHosts   []string          `json:"allow_hosts,omitempty"`
	AllowPrivate []string          `json:"allow_private,omitempty"`
	NoNetwork    bool              `json:"no_network,omitempty"`
	Secrets      []secret          `json:"secrets,omitempty"`
	Mounts       []MountConfig     `json:"mounts,omitempty"`
}

type secret struct {
	Name  string   `json:"name"`
	Value string   `json:"value"`
	Hosts []string `json:"hosts,omitempty"`
}

// MountConfig is a host directory (HostPath) or a named volume (Volume)
// mounted in the guest; see docs/workspace.md.
type MountConfig struct {
	GuestPath string `json:"guest_path"`          // set by Builder.Mount
	HostPath  string `json:"host_path,omitempty"` // an absolute host directory
	Volume    string `json:"volume,omitempty"`    // or the name of a volume
	// Mode of a host directory: "rw" (default: guest writes reach the
	// host), "ro", or "overlay" (guest writes go to a copy-on-write layer;
	// the host directory is untouched).
	Mode     string `json:"mode,omitempty"`
	ReadOnly bool   `json:"readonly,omitempty"` // the same as Mode "ro"; for volumes, attach read-only
	// Owner is who the host's files appear owned by in the guest ("uid",
	// "uid:gid" or a user of the image); default the image's user.
	Owner string `json:"owner,omitempty"`
}

// New starts a description of a sandbox booted from image ("alpine:latest",
// "busybox", "name@sha256:...").
func New(image string) *Builder { return &Builder{p: createParams{Image: image}} }

// AllowHost lets the sandbox reach hosts (patterns such as "pypi.org",
// "*.githubusercontent.com", "api.example.com:443"). Egress is otherwise
// sealed.
func (b *Builder) AllowHost(hosts ...string) *Builder {
	b.p.AllowHosts = append(b.p.AllowHosts, hosts...)
	return b
}

// AllowPrivate lets the sandbox reach private destinations (addresses,
// CIDRs or names resolving to private addresses), which are refused even
// when allowed by AllowHost.
func (b *Builder) AllowPrivate(targets ...string) *Builder {
	b.p.AllowPrivate = append(b.p.AllowPrivate, targets...)
	return b
}

// WithoutNetwork gives the sandbox no network interface at all.
func (b *Builder) WithoutNetwork() *Builder { return setParam(b, &b.p.NoNetwork, true) }

// AddSecret makes value available to requests to hosts without it ever
// entering the VM: the guest's $name holds a placeholder that is replaced
// in flight on HTTPS requests to those hosts.
func (b *Builder) AddSecret(name, value string, hosts ...string) *Builder {
	b.p.Secrets = append(b.p.Secrets, secret{Name: name, Value: value, Hosts: hosts})
	return b
}

// WithEnv sets an environment variable for every command of the sandbox.
func (b *Builder) WithEnv(key, value string) *Builder {
	if b.p.Env == nil {
		b.p.Env = map[string]string{}
	}
	b.p.Env[key] = value
	return b
}

// WithCPUs sets the number of virtual CPUs (default 1).
func (b *Builder) WithCPUs(n int) *Builder { return setParam(b, &b.p.CPUs, n) }

// WithMemory sets the guest memory in MiB (default 512).
func (b *Builder) WithMemory(mib int) *Builder { return setParam(b, &b.p.MemoryMiB, mib) }

// WithDiskSize sets the size of the writable layer in MiB (default 4096).
func (b *Builder) WithDiskSize(mib int) *Builder { return setParam(b, &b.p.DiskSizeMiB, mib) }

// WithWorkdir sets the default working directory of commands.
func (b *Builder) WithWorkdir(dir string) *Builder { return setParam(b, &b.p.Workdir, dir) }

// WithUser sets the default user of commands ("name", "uid", "uid:gid").
func (b *Builder) WithUser(user string) *Builder { return setParam(b, &b.p.User, user) }

// WithHostname sets the guest's hostname (default: the sandbox id).
func (b *Builder) WithHostname(name string) *Builder { return setParam(b, &b.p.Hostname, name) }

// Mount mounts a host directory or a volume at guestPath:
//
//	sdk.New("alpine:latest").Mount("/workspace", sdk.MountConfig{HostPath: dir})
func (b *Builder) Mount(guestPath string, m MountConfig) *Builder {
	m.GuestPath = guestPath
	b.p.Mounts = append(b.p.Mounts, m)
	return b
}

// setParam stores v in field, one of b's parameters, and returns b: the
// body of each plain setter above.
func setParam[T any](b *Builder, field *T, v T) *Builder {
	*field = v
	return b
}

// ImageInfo is the part of the image's config the sandbox uses.
type ImageInfo struct {
	Entrypoint []string `json:"entrypoint"`
	Cmd        []string `json:"cmd"`
	Env        []string `json:"env"`
	Workdir    string   `json:"workdir"`
	User       string   `json:"user"`
}

// Launch boots the sandbox b describes and makes it the Client's current
// sandbox. It returns the sandbox id.
func (c *Client) Launch(b *Builder) (string, error) {
	return c.LaunchContext(context.Background(), b)
}

// LaunchContext is Launch with a context; cancelling it stops the boot.
func (c *Client) LaunchContext(ctx context.Context, b *Builder) (string, error) {
	vm, err := c.LaunchVM(ctx, b)
	if err != nil {
		return "", err
	}
	return vm.ID(), nil
}

// LaunchVM boots a sandbox, makes it current, and returns its handle.
func (c *Client) LaunchVM(ctx context.Context, b *Builder) (*VM, error) {
	var res struct {
		ID    string    `json:"id"`
		Image ImageInfo `json:"image"`
	}
	if b == nil {
		return nil, fmt.Errorf("%w: Launch(nil)", ErrInvalid)
	}
	if err := c.call(ctx, "create", b.p, nil, &res); err != nil {
		return nil, err
	}
	vm := &VM{c: c, id: res.ID, Image: res.Image}
	c.mu.Lock()
	c.current = vm
	c.mu.Unlock()
	return vm, nil
}

// VM returns a handle on the sandbox with the given id (launched by this
// Client). It does not change the current sandbox.
func (c *Client) VM(id string) *VM { return &VM{c: c, id: id} }

// Current returns the current sandbox (the one launched last), or nil.
func (c *Client) Current() *VM {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.current
}

// Use makes the sandbox with the given id current.
func (c *Client) Use(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.current = &VM{c: c, id: id}
}
