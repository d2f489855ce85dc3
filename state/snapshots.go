package state

import (
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Snapshot statuses.
const (
	SnapshotCreating = "creating" // being written by CreatorPID
	SnapshotReady    = "ready"
)

// Snapshot sentinels.
var (
	ErrNoSnapshot     = errors.New("no such snapshot")
	ErrSnapshotExists = errors.New("snapshot name already in use")
	ErrSnapshotInUse  = errors.New("snapshot in use")
)

// Snapshot is one snapshots row. Its files live in the snapshot store
// (package snapshot); Info is the snapshot's description as JSON.
type Snapshot struct {
	Name         string          `json:"name"`
	Status       string          `json:"status"`
	Auto         bool            `json:"auto,omitempty"` // made by fork: removed with its last user
	Source       string          `json:"source,omitempty"`
	Image        string          `json:"image"`
	Created      time.Time       `json:"created"`
	CreatorPID   int             `json:"-"`
	CreatorStart uint64          `json:"-"`
	Size         int64           `json:"size"` // bytes on disk
	Info         json.RawMessage `json:"info,omitempty"`
}

// SnapshotRef records that a process uses a snapshot: a sandbox restored
// from it maps its RAM file, which must not go away while the process
// lives. A reference whose process is gone counts for nothing; that makes
// the count right even after a SIGKILL.
type SnapshotRef struct {
	Snapshot string    `json:"snapshot"`
	Holder   string    `json:"holder"` // usually a sandbox id
	PID      int       `json:"pid"`
	PIDStart uint64    `json:"-"`
	Created  time.Time `json:"created"`
}

const snapCols = `name, status, auto, source, image, created, creator_pid, creator_start, size, info`

func scanSnapshot(row interface{ Scan(...any) error }) (*Snapshot, error) {
	var s Snapshot
	var created int64
	var info string
	if err := row.Scan(&s.Name, &s.Status, &s.Auto, &s.Source, &s.Image, &created, &s.CreatorPID, &s.CreatorStart, &s.Size, &info); err != nil {
		return nil, err
	}
	s.Created = time.Unix(0, created)
	s.Info = json.RawMessage(info)
	return &s, nil
}

// InsertSnapshot adds a snapshot row (normally in status creating). A
// taken name gives ErrSnapshotExists.
func (d *DB) InsertSnapshot(s *Snapshot) error {
	info := string(s.Info)
	if info == "" {
		info = "{}"
	}
	_, err := d.db.Exec(`INSERT INTO snapshots (`+snapCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		s.Name, s.Status, s.Auto, s.Source, s.Image, s.Created.UnixNano(), s.CreatorPID, s.CreatorStart, s.Size, info)
	if err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed") {
		return fmt.Errorf("%w: %q", ErrSnapshotExists, s.Name)
	}
	return err
}

// SnapshotReady marks a snapshot as complete, with its size and
// description. With holder set, a reference for (holder, pid) is added in
// the same transaction, so that an auto snapshot is never unreferenced.
func (d *DB) SnapshotReady(name string, size int64, info json.RawMessage, holder string, pid int) error {
	tx, err := d.db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if len(info) == 0 {
		info = json.RawMessage("{}")
	}
	res, err := tx.Exec(`UPDATE snapshots SET status = ?, size = ?, info = ? WHERE name = ?`, SnapshotReady, size, string(info), name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return fmt.Errorf("%w: %s (removed while it was being written)", ErrNoSnapshot, name)
	}
	if holder != "" {
		if err := insertRef(tx, name, holder, pid); err != nil {
			return err
		}
	}
	return tx.Commit()
}

func insertRef(tx *sql.Tx, name, holder string, pid int) error {
	_, err := tx.Exec(`INSERT OR REPLACE INTO snapshot_refs (snapshot, holder, pid, pid_start, created) VALUES (?, ?, ?, ?, ?)`,
		name, holder, pid, ProcessStart(pid), time.Now().UnixNano())
	return err
}

// GetSnapshot returns the snapshot named name.
func (d *DB) GetSnapshot(name string) (*Snapshot, error) {
	s, err := scanSnapshot(d.db.QueryRow(`SELECT `+snapCols+` FROM snapshots WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("%w: %s", ErrNoSnapshot, name)
	}
	return s, err
}

// ListSnapshots returns every snapshot, newest first.
func (d *DB) ListSnapshots() ([]*Snapshot, error) {
	rows, err := d.db.Query(`SELECT ` + snapCols + ` FROM snapshots ORDER BY created DESC`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Snapshot
	for rows.Next() {
		s, err := scanSnapshot(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

// DeleteSnapshot removes a snapshot row and its references, whoever uses
// it (for cleaning up after a failed or interrupted creation).
func (d *DB) DeleteSnapshot(name string) error {
	tx, err := d.db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`DELETE FROM snapshot_refs WHERE snapshot = ?`, name); err != nil {
		return err
	}
	if _, err := tx.Exec(`DELETE FROM snapshots WHERE name = ?`, name); err != nil {
		return err
	}
	return tx.Commit()
}

// liveRefsTx returns the references to name whose process is alive and
// deletes the others.
func liveRefsTx(tx *sql.Tx, name string) ([]SnapshotRef, error) {
	rows, err := tx.Query(`SELECT snapshot, holder, pid, pid_start, created FROM snapshot_refs WHERE snapshot = ?`, name)
	if err != nil {
		return nil, err
	}
	var live, dead []SnapshotRef
	for rows.Next() {
		var r SnapshotRef
		var created int64
		if err := rows.Scan(&r.Snapshot, &r.Holder, &r.PID, &r.PIDStart, &created); err != nil {
			rows.Close()
			return nil, err
		}
		r.Created = time.Unix(0, created)
		if Alive(r.PID, r.PIDStart) {
			live = append(live, r)
		} else {
			dead = append(dead, r)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for _, r := range dead {
		if _, err := tx.Exec(`DELETE FROM snapshot_refs WHERE snapshot = ? AND holder = ?`, r.Snapshot, r.Holder); err != nil {
			return nil, err
		}
	}
	return live, nil
}

// SnapshotUsers returns the live references to a snapshot (and forgets
// the dead ones).
func (d *DB) SnapshotUsers(name string) ([]SnapshotRef, error) {
	tx, err := d.db.Begin()
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	live, err := liveRefsTx(tx, name)
	if err != nil {
		return nil, err
	}
	return live, tx.Commit()
}

// RemoveSnapshot deletes the row of a ready snapshot that no live process
// uses, in one transaction with the check. It returns ErrSnapshotInUse
// (and the users) otherwise. The caller removes the files afterwards.
func (d *DB) RemoveSnapshot(name string) ([]SnapshotRef, error) {
	tx, err := d.db.Begin()
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	s, err := scanSnapshot(tx.QueryRow(`SELECT `+snapCols+` FROM snapshots WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("%w: %s", ErrNoSnapshot, name)
	}
	if err != nil {
		return nil, err
	}
	if s.Status == SnapshotCreating && Alive(s.CreatorPID, s.CreatorStart) {
		return nil, fmt.Errorf("%w: %s is being created", ErrSnapshotInUse, name)
	}
	live, err := liveRefsTx(tx, name)
	if err != nil {
		return nil, err
	}
	if len(live) > 0 {
		tx.Commit() // keep the pruning of dead references
		return live, fmt.Errorf("%w: %s", ErrSnapshotInUse, name)
	}
	if _, err := tx.Exec(`DELETE FROM snapshot_refs WHERE snapshot = ?`, name); err != nil {
		return nil, err
	}
	if _, err := tx.Exec(`DELETE FROM snapshots WHERE name = ?`, name); err != nil {
		return nil, err
	}
	return nil, tx.Commit()
}

// AcquireSnapshot records that (holder, pid) uses the ready snapshot name.
func (d *DB) AcquireSnapshot(name, holder string, pid int) (*Snapshot, error) {
	tx, err := d.db.Begin()
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	s, err := scanSnapshot(tx.QueryRow(`SELECT `+snapCols+` FROM snapshots WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) || err == nil && s.Status != SnapshotReady {
		return nil, fmt.Errorf("%w: %s", ErrNoSnapshot, name)
	}
	if err != nil {
		return nil, err
	}
	if err := insertRef(tx, name, holder, pid); err != nil {
		return nil, err
	}
	return s, tx.Commit()
}

// ReleaseSnapshot drops the reference of holder.
func (d *DB) ReleaseSnapshot(name, holder string) error {
	return d.exec(`DELETE FROM snapshot_refs WHERE snapshot = ? AND holder = ?`, name, holder)
}
