// Package qemu runs machines with QEMU's microvm board: a PVH vmlinux booted
// directly (no firmware, no option ROMs), -nodefaults, and virtio-mmio
// devices only. The control channel and the QMP monitor are socketpairs
// inherited by QEMU, so nothing listens on the filesystem and there is no
// connect race; the NIC is a third inherited socketpair (-netdev stream).
package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/vmm"
)

// Binary is the QEMU system emulator used by default.
const Binary = "qemu-system-x86_64"

// ControlPortName is the virtio-serial port name the guest agent looks for.
const ControlPortName = "matchlock.ctl"

// Backend is the QEMU implementation of vmm.Backend.
type Backend struct {
	// Binary overrides the QEMU executable (default: Binary on PATH).
	Binary string
}

var _ vmm.Backend = (*Backend)(nil)
var _ vmm.Machine = (*Machine)(nil)

// Machine is a running QEMU process.
type Machine struct {
	cmd     *exec.Cmd
	control net.Conn
	qmp     net.Conn

	stderr syncBuffer // QEMU's own diagnostics, for error messages

	snap snapState // snapshot support (snapshot.go)

	waitOnce sync.Once
	waitErr  error
	done     chan struct{}
}

// Control returns the host end of the guest agent's virtio-serial port.
func (m *Machine) Control() net.Conn { return m.control }

// QMP returns the host end of the QMP monitor.
func (m *Machine) QMP() net.Conn { return m.qmp }

// Pid returns QEMU's process id.
func (m *Machine) Pid() int { return m.cmd.Process.Pid }

// Done is closed when QEMU has exited.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Wait blocks until QEMU exits.
func (m *Machine) Wait() error {
	<-m.done
	return m.waitErr
}

// Kill sends SIGKILL to QEMU. Safe to call repeatedly and after exit.
func (m *Machine) Kill() error {
	select {
	case <-m.done:
		return nil
	default:
	}
	err := m.cmd.Process.Kill()
	if errors.Is(err, os.ErrProcessDone) {
		return nil
	}
	return err
}

// Stderr returns what QEMU printed on its standard error so far.
func (m *Machine) Stderr() string { return m.stderr.String() }

// Start launches QEMU for spec.
func (b *Backend) Start(ctx context.Context, spec vmm.Spec) (vmm.Machine, error) {
	return b.start(ctx, spec)
}

func (b *Backend) start(ctx context.Context, spec vmm.Spec) (*Machine, error) {
	bin := b.Binary
	if bin == "" {
		bin = Binary
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("qemu: %s not found: install the qemu-system-x86 package", bin)
	}
	if spec.Accel == "" {
		return nil, errors.New("qemu: spec.Accel is empty")
	}

	ctlHost, ctlGuest, err := socketpair()
	if err != nil {
		return nil, fmt.Errorf("qemu: control socketpair: %w", err)
	}
	defer ctlGuest.Close()
	qmpHost, qmpGuest, err := socketpair()
	if err != nil {
		ctlHost.Close()
		return nil, fmt.Errorf("qemu: qmp socketpair: %w", err)
	}
	defer qmpGuest.Close()

	extra := []*os.File{ctlGuest, qmpGuest}
	netFD := -1
	if spec.Net != nil {
		netFD = 3 + len(extra)
		extra = append(extra, spec.Net.Conn)
	}
	args := Args(spec, 3, 4, netFD)
	memfd, memArgs, err := memoryArgs(path, spec, 3+len(extra))
	if err != nil {
		ctlHost.Close()
		qmpHost.Close()
		return nil, err
	}
	if memfd != nil {
		defer memfd.Close() // the Machine keeps its own copy
		extra = append(extra, memfd)
	}
	args = append(args, memArgs...)

	cmd := exec.Command(path, args...)
	cmd.ExtraFiles = extra
	cmd.Stdin = nil
	m := &Machine{cmd: cmd, done: make(chan struct{})}
	m.snap.init(path, spec, memfd)
	if spec.ConsoleLog != nil {
		cmd.Stdout = spec.ConsoleLog
	}
	cmd.Stderr = &m.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// QEMU must never outlive us, even when we are SIGKILLed.
		Pdeathsig: syscall.SIGKILL,
		Setpgid:   true,
	}
	if err := spawn(cmd); err != nil {
		ctlHost.Close()
		qmpHost.Close()
		m.snap.close()
		return nil, fmt.Errorf("qemu: start: %w", err)
	}
	m.control, err = net.FileConn(ctlHost)
	ctlHost.Close()
	if err != nil {
		cmd.Process.Kill()
		return nil, fmt.Errorf("qemu: control conn: %w", err)
	}
	m.qmp, err = net.FileConn(qmpHost)
	qmpHost.Close()
	if err != nil {
		cmd.Process.Kill()
		return nil, fmt.Errorf("qemu: qmp conn: %w", err)
	}
	go func() {
		err := cmd.Wait()
		if err != nil {
			msg := strings.TrimSpace(m.stderr.String())
			if msg != "" {
				err = fmt.Errorf("qemu: %w: %s", err, lastLine(msg))
			} else {
				err = fmt.Errorf("qemu: %w", err)
			}
		}
		m.waitErr = err
		m.control.Close()
		m.qmp.Close()
		m.snap.close()
		close(m.done)
	}()
	if spec.RestoreFrom != "" {
		if err := m.incoming(ctx, spec.RestoreFrom); err != nil {
			m.Kill()
			<-m.done
			return nil, err
		}
	}
	return m, nil
}

// Args builds QEMU's command line. ctlFD, qmpFD and netFD are the numbers of
// the inherited descriptors (netFD < 0: no NIC).
func Args(spec vmm.Spec, ctlFD, qmpFD, netFD int) []string {
	cpus := spec.CPUs
	if cpus <= 0 {
		cpus = 1
	}
	mem := spec.MemoryMiB
	if mem <= 0 {
		mem = 512
	}
	a := []string{
		"-M", "microvm,acpi=off,x-option-roms=off,rtc=on,pit=on,pic=on,isa-serial=on",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-m", strconv.Itoa(mem), "-smp", strconv.Itoa(cpus),
	}
	// Only words the kernel knows: unknown ones are passed to /init as
	// arguments or environment. (The project kernel has no ACPI and is not
	// relocatable, so acpi=off and nokaslr are not among them.)
	cmdline := []string{
		"console=ttyS0", "reboot=t", "panic=-1",
		"8250.nr_uarts=1", "cryptomgr.notests", "no_timer_check", "quiet",
		"random.trust_cpu=on",
	}
	if cpus == 1 {
		// One CPU: skip rewriting the kernel's ~7000 lock prefixes at boot
		// (self-modifying code is slow under TCG; -90 ms measured).
		cmdline = append(cmdline, "noreplace-smp")
	}
	switch spec.Accel {
	case "kvm":
		a = append(a, "-accel", "kvm", "-cpu", "host")
	default:
		a = append(a, "-accel", "tcg,thread=single", "-cpu", "qemu64,+arat")
		cmdline = append(cmdline, "tsc=reliable", "nolapic_timer")
		if khz := hostTSCkHz(); khz > 0 {
			cmdline = append(cmdline, "tsc_early_khz="+strconv.Itoa(khz))
		}
	}
	cmdline = append(cmdline, spec.Cmdline...)
	if spec.RestoreFrom == "" {
		// A restored machine must not load the kernel again: QEMU would
		// write its pristine image over the running guest's memory.
		a = append(a,
			"-kernel", spec.Kernel,
			"-initrd", spec.Initrd,
			"-append", strings.Join(cmdline, " "))
	}
	a = append(a,
		"-chardev", "stdio,id=con0,signal=off",
		"-serial", "chardev:con0",
		"-chardev", fmt.Sprintf("socket,id=ctl0,fd=%d,server=off", ctlFD),
		"-device", "virtio-serial-device,max_ports=2",
		"-device", "virtserialport,chardev=ctl0,name="+ControlPortName,
		"-chardev", fmt.Sprintf("socket,id=qmp0,fd=%d,server=off", qmpFD),
		"-mon", "chardev=qmp0,mode=control",
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", "virtio-rng-device,rng=rng0",
	)
	for i, d := range spec.Disks {
		id := fmt.Sprintf("vd%c", 'a'+i)
		opt := fmt.Sprintf("id=%s,file=%s,format=raw,if=none,discard=unmap", id, escapeComma(d.Path))
		if d.ReadOnly {
			opt += ",readonly=on"
		} else {
			opt += ",cache=unsafe"
		}
		a = append(a, "-drive", opt, "-device", "virtio-blk-device,drive="+id)
	}
	for i, sh := range spec.Shares {
		opt := fmt.Sprintf("local,id=fs%d,path=%s,security_model=none", i, escapeComma(sh.Path))
		if sh.ReadOnly {
			opt += ",readonly=on"
		}
		a = append(a, "-fsdev", opt, "-device", fmt.Sprintf("virtio-9p-device,fsdev=fs%d,mount_tag=%s", i, escapeComma(sh.Tag)))
	}
	if spec.Net != nil && netFD >= 0 {
		dev := "virtio-net-device,netdev=net0"
		if spec.Net.MAC != "" {
			dev += ",mac=" + spec.Net.MAC
		}
		if spec.Net.MTU > 0 {
			dev += ",host_mtu=" + strconv.Itoa(spec.Net.MTU)
		}
		netdev := fmt.Sprintf("stream,id=net0,server=off,addr.type=fd,addr.str=%d", netFD)
		if spec.Net.Slirp { // benchmark baseline only (vmm.Net.Slirp)
			netdev = "user,id=net0,net=10.213.0.0/24,host=10.213.0.1,dns=10.213.0.3"
		}
		a = append(a, "-netdev", netdev, "-device", dev)
	}
	return a
}

// escapeComma doubles commas, QEMU's escape inside option values.
func escapeComma(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func socketpair() (host, guest *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	return os.NewFile(uintptr(fds[0]), "host"), os.NewFile(uintptr(fds[1]), "guest"), nil
}

// Pdeathsig fires when the *thread* that forked the child exits, not the
// process. Go may retire a thread whose goroutine locked it and exited, so
// every QEMU is forked from one goroutine that locks its thread forever.
var spawnCh = make(chan spawnReq)

type spawnReq struct {
	cmd  *exec.Cmd
	resp chan error
}

var spawnOnce sync.Once

func spawn(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		go func() {
			runtime.LockOSThread() // never unlocked: this thread lives as long as the process
			for r := range spawnCh {
				r.resp <- r.cmd.Start()
			}
		}()
	})
	resp := make(chan error, 1)
	spawnCh <- spawnReq{cmd, resp}
	return <-resp
}

// hostTSCkHz reads the host TSC frequency. Under TCG the guest needs it on
// its command line (tsc_early_khz) or ~8% of boots hang calibrating.
var hostTSCkHz = sync.OnceValue(func() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil && f > 0 {
				return int(f * 1000)
			}
		}
	}
	return 0
})

func lastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// syncBuffer is a bounded, concurrency-safe buffer for QEMU's stderr: it
// keeps the last 64 KiB.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

const stderrKeep = 64 << 10

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Write(p)
	if b.buf.Len() > stderrKeep {
		keep := b.buf.Bytes()[b.buf.Len()-stderrKeep:]
		nb := make([]byte, len(keep))
		copy(nb, keep)
		b.buf.Reset()
		b.buf.Write(nb)
	}
	return len(p), nil
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

var _ io.Writer = (*syncBuffer)(nil)
