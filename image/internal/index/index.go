// Package index is the image store's SQLite index: images, the names that
// point at them, and converted root filesystems. The database runs in WAL
// mode with a busy timeout so that several matchlock processes can share it;
// every change is one IMMEDIATE transaction, so a killed process leaves
// either all of a change or none of it.
package index

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// ErrNotFound: no such image or name.
var ErrNotFound = errors.New("not found")

// migrations are applied in order; the database's user_version counts how
// many it has. Never edit one that has shipped: append a new one.
var migrations = []string{
	// 1: images, names, root filesystems.
	`CREATE TABLE images (
		digest        TEXT PRIMARY KEY,  -- manifest digest, sha256:<hex>
		media_type    TEXT NOT NULL,     -- manifest media type
		config_digest TEXT NOT NULL,
		index_digest  TEXT NOT NULL DEFAULT '', -- the multi-arch index it was picked from, if any
		platform      TEXT NOT NULL,     -- os/arch[/variant]
		config        BLOB NOT NULL,     -- OCI image config JSON
		layers        TEXT NOT NULL,     -- JSON [{digest,size,mediaType}], lowest first
		size          INTEGER NOT NULL,  -- bytes of config and layer blobs
		created       INTEGER NOT NULL,  -- unix ns, from the config (or import time)
		added         INTEGER NOT NULL,  -- unix ns
		last_used     INTEGER NOT NULL   -- unix ns
	);
	CREATE INDEX images_index_digest ON images(index_digest);
	CREATE TABLE names (
		name   TEXT PRIMARY KEY,  -- repo:tag or repo@digest
		repo   TEXT NOT NULL,     -- canonical repository, registry included
		tag    TEXT NOT NULL,     -- '' for a digest reference
		digest TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE
	);
	CREATE INDEX names_digest ON names(digest);
	CREATE TABLE rootfs (
		key       TEXT PRIMARY KEY,  -- converter version and layer digests, hashed
		file      TEXT NOT NULL,     -- path relative to the store root
		size      INTEGER NOT NULL,
		created   INTEGER NOT NULL,
		last_used INTEGER NOT NULL
	);`,
}

// DB is an open index. Safe for concurrent use.
type DB struct{ db *sql.DB }

// Open opens (creating and migrating as needed) the index at path.
func Open(path string) (*DB, error) {
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(15000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Add("_pragma", "foreign_keys(1)")
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, err
	}
	d := &DB{db: db}
	if err := d.migrate(); err != nil {
		db.Close()
		return nil, err
	}
	return d, nil
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

func (d *DB) migrate() error {
	return d.tx(func(tx *sql.Tx) error {
		var v int
		if err := tx.QueryRow(`PRAGMA user_version`).Scan(&v); err != nil {
			return err
		}
		if v > len(migrations) {
			return fmt.Errorf("index schema version %d is newer than this matchlock knows (%d): upgrade matchlock", v, len(migrations))
		}
		for i := v; i < len(migrations); i++ {
			if _, err := tx.Exec(migrations[i]); err != nil {
				return fmt.Errorf("migration %d: %w", i+1, err)
			}
		}
		if v != len(migrations) {
			_, err := tx.Exec(fmt.Sprintf(`PRAGMA user_version = %d`, len(migrations)))
			return err
		}
		return nil
	})
}

func (d *DB) tx(fn func(*sql.Tx) error) error {
	tx, err := d.db.BeginTx(context.Background(), nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// Layer is one layer blob of an image.
type Layer struct {
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
	MediaType string `json:"mediaType"`
}

// Image is one row of the images table.
type Image struct {
	Digest, MediaType, ConfigDigest, IndexDigest, Platform string
	Config                                                 []byte
	Layers                                                 []Layer
	Size                                                   int64
	Created, Added, LastUsed                               time.Time
}

// Name is a reference to an image: repo:tag, or repo@Pinned when Tag is
// "". Pinned is the digest the reference was written with: the image's own,
// or that of the multi-arch index it was picked from. Digest is the image's.
type Name struct {
	Repo, Tag, Pinned, Digest string
}

// Key is the name's primary key.
func (n Name) Key() string {
	if n.Tag == "" {
		return n.Repo + "@" + n.Pinned
	}
	return n.Repo + ":" + n.Tag
}

// fill sets Pinned from the key of a digest name.
func (n *Name) fill(key string) {
	if n.Tag == "" {
		if i := strings.LastIndexByte(key, '@'); i >= 0 {
			n.Pinned = key[i+1:]
		}
	}
}

const imageCols = `digest, media_type, config_digest, index_digest, platform, config, layers, size, created, added, last_used`

// Put records img (keeping its added time if it is already there) and
// points names at it, in one transaction. Names moved away from another
// image leave that image in place, dangling if it has no other name.
func (d *DB) Put(img Image, names []Name) error {
	layers, err := json.Marshal(img.Layers)
	if err != nil {
		return err
	}
	return d.tx(func(tx *sql.Tx) error {
		_, err := tx.Exec(`INSERT INTO images (`+imageCols+`) VALUES (?,?,?,?,?,?,?,?,?,?,?)
			ON CONFLICT(digest) DO UPDATE SET last_used = excluded.last_used,
				index_digest = CASE WHEN excluded.index_digest != '' THEN excluded.index_digest ELSE images.index_digest END`,
			img.Digest, img.MediaType, img.ConfigDigest, img.IndexDigest, img.Platform, img.Config, string(layers),
			img.Size, img.Created.UnixNano(), img.Added.UnixNano(), img.LastUsed.UnixNano())
		if err != nil {
			return err
		}
		for _, n := range names {
			n.Digest = img.Digest
			if err := setName(tx, n); err != nil {
				return err
			}
		}
		return nil
	})
}

func setName(tx *sql.Tx, n Name) error {
	_, err := tx.Exec(`INSERT INTO names (name, repo, tag, digest) VALUES (?,?,?,?)
		ON CONFLICT(name) DO UPDATE SET digest = excluded.digest`, n.Key(), n.Repo, n.Tag, n.Digest)
	return err
}

// SetName points n at the image n.Digest, which must exist.
func (d *DB) SetName(n Name) error {
	return d.tx(func(tx *sql.Tx) error {
		var one int
		if err := tx.QueryRow(`SELECT 1 FROM images WHERE digest = ?`, n.Digest).Scan(&one); err != nil {
			if errors.Is(err, sql.ErrNoRows) {
				return ErrNotFound
			}
			return err
		}
		return setName(tx, n)
	})
}

// Get returns the image with manifest digest dgst.
func (d *DB) Get(dgst string) (*Image, error) {
	imgs, err := d.query(`SELECT `+imageCols+` FROM images WHERE digest = ?`, dgst)
	if err != nil {
		return nil, err
	}
	if len(imgs) == 0 {
		return nil, ErrNotFound
	}
	return &imgs[0], nil
}

// ByIndex returns the images picked from the multi-arch index dgst.
func (d *DB) ByIndex(dgst string) ([]Image, error) {
	return d.query(`SELECT `+imageCols+` FROM images WHERE index_digest = ?`, dgst)
}

// ByPrefix returns the images whose manifest or index digest starts with
// sha256:<hexPrefix>.
func (d *DB) ByPrefix(hexPrefix string) ([]Image, error) {
	for _, c := range hexPrefix {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return nil, nil
		}
	}
	p := "sha256:" + hexPrefix + "%"
	return d.query(`SELECT `+imageCols+` FROM images WHERE digest LIKE ? OR index_digest LIKE ? ORDER BY digest`, p, p)
}

// All returns every image, newest first.
func (d *DB) All() ([]Image, error) {
	return d.query(`SELECT ` + imageCols + ` FROM images ORDER BY added DESC, digest`)
}

func (d *DB) query(q string, args ...any) ([]Image, error) {
	rows, err := d.db.Query(q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Image
	for rows.Next() {
		var img Image
		var layers string
		var created, added, used int64
		if err := rows.Scan(&img.Digest, &img.MediaType, &img.ConfigDigest, &img.IndexDigest, &img.Platform,
			&img.Config, &layers, &img.Size, &created, &added, &used); err != nil {
			return nil, err
		}
		if err := json.Unmarshal([]byte(layers), &img.Layers); err != nil {
			return nil, fmt.Errorf("image %s: bad layer list: %w", img.Digest, err)
		}
		img.Created, img.Added, img.LastUsed = time.Unix(0, created), time.Unix(0, added), time.Unix(0, used)
		out = append(out, img)
	}
	return out, rows.Err()
}

// Lookup returns the name with key repo:tag or repo@digest.
func (d *DB) Lookup(key string) (*Name, error) {
	var n Name
	err := d.db.QueryRow(`SELECT repo, tag, digest FROM names WHERE name = ?`, key).Scan(&n.Repo, &n.Tag, &n.Digest)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrNotFound
	}
	n.fill(key)
	return &n, err
}

// Names returns every name, grouped by image digest, sorted.
func (d *DB) Names() (map[string][]Name, error) {
	rows, err := d.db.Query(`SELECT name, repo, tag, digest FROM names ORDER BY name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string][]Name{}
	for rows.Next() {
		var n Name
		var key string
		if err := rows.Scan(&key, &n.Repo, &n.Tag, &n.Digest); err != nil {
			return nil, err
		}
		n.fill(key)
		out[n.Digest] = append(out[n.Digest], n)
	}
	return out, rows.Err()
}

// RemoveName deletes the name with key, and its image if no name is left.
// It reports whether the image was deleted.
func (d *DB) RemoveName(key string) (imageDeleted bool, err error) {
	err = d.tx(func(tx *sql.Tx) error {
		var dgst string
		if err := tx.QueryRow(`DELETE FROM names WHERE name = ? RETURNING digest`, key).Scan(&dgst); err != nil {
			if errors.Is(err, sql.ErrNoRows) {
				return ErrNotFound
			}
			return err
		}
		var left int
		if err := tx.QueryRow(`SELECT count(*) FROM names WHERE digest = ?`, dgst).Scan(&left); err != nil {
			return err
		}
		if left == 0 {
			imageDeleted = true
			_, err := tx.Exec(`DELETE FROM images WHERE digest = ?`, dgst)
			return err
		}
		return nil
	})
	return imageDeleted, err
}

// DeleteImage deletes the image dgst and every name pointing at it.
func (d *DB) DeleteImage(dgst string) error {
	return d.tx(func(tx *sql.Tx) error {
		res, err := tx.Exec(`DELETE FROM images WHERE digest = ?`, dgst)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return ErrNotFound
		}
		_, err = tx.Exec(`DELETE FROM names WHERE digest = ?`, dgst)
		return err
	})
}

// DeleteDangling deletes the images no name points at and returns their
// digests.
func (d *DB) DeleteDangling() ([]string, error) {
	var out []string
	err := d.tx(func(tx *sql.Tx) error {
		rows, err := tx.Query(`DELETE FROM images WHERE digest NOT IN (SELECT digest FROM names) RETURNING digest`)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var s string
			if err := rows.Scan(&s); err != nil {
				return err
			}
			out = append(out, s)
		}
		return rows.Err()
	})
	return out, err
}

// Touch sets the image's last-used time.
func (d *DB) Touch(dgst string, t time.Time) error {
	_, err := d.db.Exec(`UPDATE images SET last_used = ? WHERE digest = ?`, t.UnixNano(), dgst)
	return err
}

// Rootfs is one converted root filesystem.
type Rootfs struct {
	Key, File         string
	Size              int64
	Created, LastUsed time.Time
}

// PutRootfs records a converted root filesystem.
func (d *DB) PutRootfs(r Rootfs) error {
	_, err := d.db.Exec(`INSERT INTO rootfs (key, file, size, created, last_used) VALUES (?,?,?,?,?)
		ON CONFLICT(key) DO UPDATE SET file = excluded.file, size = excluded.size, last_used = excluded.last_used`,
		r.Key, r.File, r.Size, r.Created.UnixNano(), r.LastUsed.UnixNano())
	return err
}

// GetRootfs returns the root filesystem with key, touching it.
func (d *DB) GetRootfs(key string, now time.Time) (*Rootfs, error) {
	r := Rootfs{Key: key}
	var created int64
	err := d.db.QueryRow(`UPDATE rootfs SET last_used = ? WHERE key = ? RETURNING file, size, created`,
		now.UnixNano(), key).Scan(&r.File, &r.Size, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	r.Created, r.LastUsed = time.Unix(0, created), now
	return &r, nil
}

// AllRootfs lists the converted root filesystems.
func (d *DB) AllRootfs() ([]Rootfs, error) {
	rows, err := d.db.Query(`SELECT key, file, size, created, last_used FROM rootfs ORDER BY key`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Rootfs
	for rows.Next() {
		var r Rootfs
		var c, u int64
		if err := rows.Scan(&r.Key, &r.File, &r.Size, &c, &u); err != nil {
			return nil, err
		}
		r.Created, r.LastUsed = time.Unix(0, c), time.Unix(0, u)
		out = append(out, r)
	}
	return out, rows.Err()
}

// DeleteRootfs forgets the root filesystem with key.
func (d *DB) DeleteRootfs(key string) error {
	_, err := d.db.Exec(`DELETE FROM rootfs WHERE key = ?`, key)
	return err
}
