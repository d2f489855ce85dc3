package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/snapshot"
	"matchlock.dev/matchlock/state"
)

// Snapshots of a long-lived sandbox are taken by its supervisor, which
// owns the VM: the whole creation (write, commit) happens in that process,
// so a client that goes away mid-way changes nothing.
const (
	KindSnapshot = "supervisor.snapshot"
	KindFork     = "supervisor.fork"
)

// MaxForks bounds one fork request.
const MaxForks = 64

// snapshotOpTimeout bounds a snapshot or fork, which outlives its client.
const snapshotOpTimeout = 10 * time.Minute

// SnapshotRequest is the header of a KindSnapshot or KindFork stream.
type SnapshotRequest struct {
	Kind string `json:"kind"`
	Name string `json:"name,omitempty"` // KindSnapshot
	N    int    `json:"n,omitempty"`    // KindFork: how many sandboxes
	// AllowHosts, when set, replaces the allow list of the forks.
	AllowHosts *[]string `json:"allow_hosts,omitempty"`
}

// SnapshotReply answers a SnapshotRequest.
type SnapshotReply struct {
	Error    string          `json:"error,omitempty"`
	Snapshot *state.Snapshot `json:"snapshot,omitempty"`
	IDs      []string        `json:"ids,omitempty"`
}

func (s *Server) snapshotRequest(ctx context.Context, st *proto.Stream) {
	defer st.Close()
	var req SnapshotRequest
	var reply SnapshotReply
	err := json.Unmarshal(st.Header(), &req)
	if err == nil {
		// ctx ends with the client's connection; the operation must not:
		// cancelled mid-way it would abandon the snapshot, and could leave
		// the guest frozen or the sandbox stopped (a cancelled reconnect).
		// Bounded like the CLI's own wait.
		opCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), snapshotOpTimeout)
		reply, err = s.snapshotOp(opCtx, req)
		cancel()
	}
	if err != nil {
		reply.Error = err.Error()
		// The client may be gone: leave a trace in the supervisor's log.
		fmt.Fprintf(os.Stderr, "supervisor: %s %q: %v\n", req.Kind, req.Name, err)
	}
	b, _ := json.Marshal(reply)
	st.SendMsg(b)
}

func (s *Server) snapshotOp(ctx context.Context, req SnapshotRequest) (SnapshotReply, error) {
	db, err := state.OpenDefault()
	if err != nil {
		return SnapshotReply{}, err
	}
	defer db.Close()
	store := snapshot.Open(db)
	image := ""
	if s.Config != nil {
		image = s.Config.Options.Image
	}
	take := func(dir string) (*sandbox.SnapshotInfo, error) { return s.SB.Snapshot(ctx, dir) }
	switch req.Kind {
	case KindSnapshot:
		row, err := store.Create(ctx, snapshot.Options{Name: req.Name, Source: s.SB.ID, Image: image}, take)
		return SnapshotReply{Snapshot: row}, err
	case KindFork:
		if req.N < 1 || req.N > MaxForks {
			return SnapshotReply{}, fmt.Errorf("fork: -n %d: want 1 to %d", req.N, MaxForks)
		}
		if s.Config == nil {
			return SnapshotReply{}, errors.New("fork: this supervisor has no configuration to copy")
		}
		name := snapshot.NewName("fork-" + s.SB.ID + "-")
		holder := "fork:" + s.SB.ID
		if _, err := store.Create(ctx, snapshot.Options{Name: name, Source: s.SB.ID, Image: image, Auto: true, Holder: holder}, take); err != nil {
			return SnapshotReply{}, err
		}
		// Each fork holds the snapshot itself once it runs; ours goes then.
		defer db.ReleaseSnapshot(name, holder)
		ids, err := s.launchForks(ctx, db, name, req)
		return SnapshotReply{IDs: ids}, err
	}
	return SnapshotReply{}, fmt.Errorf("unknown kind %q", req.Kind)
}

// launchForks starts req.N supervisors restoring the snapshot name, with
// this sandbox's options (secrets and policy included, a fresh identity).
func (s *Server) launchForks(ctx context.Context, db *state.DB, name string, req SnapshotRequest) ([]string, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	var srcConfig json.RawMessage
	if r, err := db.Get(s.SB.ID); err == nil {
		srcConfig = r.Config
	}
	ids := make([]string, req.N)
	errs := make([]error, req.N)
	var wg sync.WaitGroup
	for i := range ids {
		o := s.Config.Options
		o.ID, o.Hostname, o.RestoreFrom = "", "", ""
		if req.AllowHosts != nil {
			o.AllowHosts = *req.AllowHosts
		}
		id := sandbox.NewID()
		ids[i] = id
		if err := db.Insert(&state.Record{ID: id, Image: o.Image, Status: state.StatusStarting, Created: time.Now(), Config: srcConfig}); err != nil {
			errs[i] = err
			continue
		}
		cfg := Config{ID: id, Options: o, Pull: s.Config.Pull, Snapshot: name}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if err := Launch(ctx, exe, cfg); err != nil {
				db.Finish(cfg.ID, state.StatusStopped, nil, err.Error())
				errs[i] = fmt.Errorf("fork %s: %w", cfg.ID, err)
			}
		}(i)
	}
	wg.Wait()
	var ok []string
	for i, id := range ids {
		if errs[i] == nil {
			ok = append(ok, id)
		}
	}
	return ok, errors.Join(errs...)
}

// holdSnapshot marks the snapshot as used by this supervisor's sandbox and
// points opts at its files.
func holdSnapshot(db *state.DB, name, holder string, opts *sandbox.Options) (func(), error) {
	dir, release, err := snapshot.Open(db).Acquire(name, holder)
	if err != nil {
		return nil, err
	}
	opts.RestoreFrom = dir
	return release, nil
}

// Snapshot asks the supervisor of sandbox id to snapshot it as name.
func Snapshot(ctx context.Context, id, name string) (*state.Snapshot, error) {
	r, err := snapshotCall(ctx, id, SnapshotRequest{Kind: KindSnapshot, Name: name})
	if err != nil {
		return nil, err
	}
	return r.Snapshot, nil
}

// Fork asks the supervisor of sandbox id for n live forks; it returns the
// ids of those that started (and an error for the others).
func Fork(ctx context.Context, id string, n int, allowHosts *[]string) ([]string, error) {
	r, err := snapshotCall(ctx, id, SnapshotRequest{Kind: KindFork, N: n, AllowHosts: allowHosts})
	if r == nil {
		return nil, err
	}
	return r.IDs, err
}

func snapshotCall(ctx context.Context, id string, req SnapshotRequest) (*SnapshotReply, error) {
	var reply SnapshotReply
	if err := request(ctx, id, req, &reply); err != nil {
		return nil, err
	}
	if reply.Error != "" {
		return &reply, errors.New(reply.Error)
	}
	return &reply, nil
}
