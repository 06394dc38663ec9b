// Command presence-consumer is the reference Go consumer of the presence topics (docs/consuming.md).
//
// It bootstraps every user's status from the compacted STATE topic, then follows TRANSITIONS from the end
// offsets taken before the bootstrap, deduplicating by (epoch, seq) and repairing gaps from the query API. It
// keeps a map userid -> {status, epoch, seq} and writes it as JSON to -out every second and at exit (SIGTERM,
// SIGINT, or -until-idle seconds without a message).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// Entry is what the consumer knows of one user: the status TRANSITIONS has shown last and its number.
type Entry struct {
	Status string `json:"status"`
	Epoch  int64  `json:"epoch"`
	Seq    int64  `json:"seq"`
}

// Transition holds the fields of a transitions.v1 message this consumer uses; unknown fields are ignored.
type Transition struct {
	UserID string `json:"userid"`
	From   string `json:"from"`
	To     string `json:"to"`
	Epoch  int64  `json:"epoch"`
	Seq    int64  `json:"seq"`
	Cause  struct {
		Event string `json:"event"`
	} `json:"cause"`
}

// StateRecord holds the fields of a state.v1 message (and of the query API's answer) this consumer uses.
type StateRecord struct {
	UserID string `json:"userid"`
	Status string `json:"status"`
	Epoch  int64  `json:"epoch"`
	Seq    int64  `json:"seq"`
}

// Gap describes one transition that did not follow what the consumer had for the user.
type Gap struct {
	UserID string `json:"userid"`
	Had    *Entry `json:"had"`
	Got    Entry  `json:"got"`
	From   string `json:"from"`
}

// Stats counts what the consumer did.
type Stats struct {
	StateRecords    int `json:"state_records"`
	StateTombstones int `json:"state_tombstones"`
	Applied         int `json:"applied"`
	Repeats         int `json:"repeats"`
	NewEpochs       int `json:"new_epochs"`
	Deletions       int `json:"deletions"`
	StaleOfDeleted  int `json:"stale_of_deleted"`
	Gaps            int `json:"gaps"`
	Repairs         int `json:"repairs"`
	RepairFailures  int `json:"repair_failures"`
	IDsChecked      int `json:"ids_checked"`
	IDMismatches    int `json:"id_mismatches"`
}

// EndedEpochRetention is how long an ended epoch is remembered: TRANSITIONS' retention
// (PRESENCE_TOPIC_TRANSITIONS_RETENTION_MS, 7 days). No repeat of a transition can arrive later than that after
// the consumer saw its epoch end, so the entry can then be forgotten (docs/consuming.md, "Epochs").
const EndedEpochRetention = 7 * 24 * time.Hour

// Presence is the consumer's state: the users' map and the epochs of records it saw end.
type Presence struct {
	Users map[string]Entry
	// ended holds, per user, every epoch a tombstone or a "deleted" transition ended, and when the consumer saw it
	// end. A set, not the last one: an ended record never becomes current again, but the user's next record may
	// have a larger or a smaller epoch, and after a worker restart the repeats of several ended epochs may arrive
	// while the user has a newer record. It is kept when the user comes back, for the same reason.
	ended    map[string]map[int64]time.Time
	Stats    Stats
	Gaps     []Gap
	repairer func(userid string) (*Entry, bool, error)
}

func NewPresence() *Presence {
	return &Presence{Users: map[string]Entry{}, ended: map[string]map[int64]time.Time{}}
}

// ceID is a message's CloudEvents id header (docs/consuming.md, "Headers"); "" if it has none.
func ceID(headers []kgo.RecordHeader) string {
	for _, h := range headers {
		if h.Key == "ce_id" {
			return string(h.Value)
		}
	}
	return ""
}

// CheckID counts a ce_id that does not name what the value says: TRANSITIONS "<userid>:<epoch>:<seq>" exactly,
// a STATE value that followed by ":<digest>", a STATE tombstone "<userid>:<epoch>:<seq>:deleted".
func (p *Presence) CheckID(id string, ok bool) {
	p.Stats.IDsChecked++
	if !ok {
		p.Stats.IDMismatches++
		log.Printf("ce_id %q does not match its message", id)
	}
}

// ApplyState takes one STATE record during the bootstrap; value nil is a tombstone.
func (p *Presence) ApplyState(key string, value []byte, id string) error {
	if value == nil {
		p.CheckID(id, strings.HasPrefix(id, key+":") && strings.HasSuffix(id, ":deleted"))
		p.forget(key)
		p.Stats.StateTombstones++
		return nil
	}
	var r StateRecord
	if err := json.Unmarshal(value, &r); err != nil {
		return fmt.Errorf("STATE record for %q: %w", key, err)
	}
	p.CheckID(id, strings.HasPrefix(id, fmt.Sprintf("%s:%d:%d:", key, r.Epoch, r.Seq)))
	p.Users[key] = Entry{r.Status, r.Epoch, r.Seq}
	p.Stats.StateRecords++
	return nil
}

// ApplyTransition applies one TRANSITIONS message by the rule of docs/consuming.md (step 4).
func (p *Presence) ApplyTransition(t Transition) {
	cur, known := p.Users[t.UserID]
	deleted := t.Cause.Event == "deleted"
	switch {
	case p.isEnded(t.UserID, t.Epoch):
		// A late transition, or a repeat, of a record already deleted: whether or not the user has a record now,
		// an ended record never becomes current again.
		p.Stats.StaleOfDeleted++
		return
	case !known && deleted:
		p.Stats.Repeats++ // the deletion of a user already forgotten
		return
	case !known && t.Seq == 1:
		p.Stats.NewEpochs++
	case known && t.Epoch == cur.Epoch && t.Seq <= cur.Seq:
		p.Stats.Repeats++
		return
	case known && t.Epoch == cur.Epoch && t.Seq == cur.Seq+1 && t.From == cur.Status:
	case known && t.Epoch != cur.Epoch && t.Seq == 1:
		p.Stats.NewEpochs++
	default:
		var had *Entry
		if known {
			had = &cur
		}
		p.Stats.Gaps++
		if len(p.Gaps) < 100 {
			p.Gaps = append(p.Gaps, Gap{t.UserID, had, Entry{t.To, t.Epoch, t.Seq}, t.From})
		}
		p.set(t, deleted)
		p.repair(t.UserID)
		return
	}
	p.set(t, deleted)
}

// isEnded says whether epoch is one of the user's ended epochs. Epochs are compared for equality only: a
// smaller epoch than an ended one may be a new record (docs/consuming.md, "Epochs").
func (p *Presence) isEnded(userid string, epoch int64) bool {
	_, ok := p.ended[userid][epoch]
	return ok
}

// forget removes the user (a tombstone, a "deleted" transition, or a 404 from the query API) and remembers the
// epoch of the record that ended.
func (p *Presence) forget(userid string) {
	cur, ok := p.Users[userid]
	if !ok {
		return
	}
	delete(p.Users, userid)
	p.endEpoch(userid, cur.Epoch)
}

func (p *Presence) endEpoch(userid string, epoch int64) {
	if p.ended[userid] == nil {
		p.ended[userid] = map[int64]time.Time{}
	}
	p.ended[userid][epoch] = time.Now()
}

// ForgetOldEndedEpochs drops the ended epochs seen end more than EndedEpochRetention ago, so the sets stay small
// for users who never come back.
func (p *Presence) ForgetOldEndedEpochs() {
	oldest := time.Now().Add(-EndedEpochRetention)
	for userid, epochs := range p.ended {
		for epoch, seen := range epochs {
			if seen.Before(oldest) {
				delete(epochs, epoch)
			}
		}
		if len(epochs) == 0 {
			delete(p.ended, userid)
		}
	}
}

func (p *Presence) set(t Transition, deleted bool) {
	p.Stats.Applied++
	if deleted {
		p.Stats.Deletions++
		delete(p.Users, t.UserID)
		p.endEpoch(t.UserID, t.Epoch)
		return
	}
	p.Users[t.UserID] = Entry{t.To, t.Epoch, t.Seq}
}

// repair asks the query API for the user's record after a gap (404: the user is unknown, i.e. offline).
func (p *Presence) repair(userid string) {
	if p.repairer == nil {
		return
	}
	entry, found, err := p.repairer(userid)
	if err != nil {
		p.Stats.RepairFailures++
		log.Printf("repair of %q failed: %v", userid, err)
		return
	}
	p.Stats.Repairs++
	if !found {
		p.forget(userid)
		return
	}
	p.Users[userid] = *entry
}

func queryRepairer(base string) func(string) (*Entry, bool, error) {
	client := &http.Client{Timeout: 10 * time.Second}
	return func(userid string) (*Entry, bool, error) {
		for attempt := 0; ; attempt++ {
			resp, err := client.Get(strings.TrimRight(base, "/") + "/presence/" + url.PathEscape(userid))
			if err != nil {
				return nil, false, err
			}
			var r StateRecord
			decodeErr := json.NewDecoder(resp.Body).Decode(&r)
			resp.Body.Close()
			switch {
			case resp.StatusCode == http.StatusNotFound:
				return nil, false, nil
			case resp.StatusCode == http.StatusOK && decodeErr == nil:
				return &Entry{r.Status, r.Epoch, r.Seq}, true, nil
			case resp.StatusCode == http.StatusServiceUnavailable && attempt < 20:
				time.Sleep(500 * time.Millisecond) // partitions are being reassigned: the API says retry
			default:
				return nil, false, fmt.Errorf("query API answered %d", resp.StatusCode)
			}
		}
	}
}

type options struct {
	bootstrap   string
	transitions string
	state       string
	queryURL    string
	out         string
	untilIdle   time.Duration
	settle      time.Duration
}

func main() {
	var o options
	var idleSeconds float64
	flag.StringVar(&o.bootstrap, "bootstrap", "127.0.0.1:9092", "Kafka bootstrap servers, comma-separated")
	flag.StringVar(&o.transitions, "transitions", "presence.transitions", "TRANSITIONS topic")
	flag.StringVar(&o.state, "state", "presence.state", "STATE topic")
	flag.StringVar(&o.queryURL, "query-url", "", "query API base URL used to repair gaps (empty: count them only)")
	flag.StringVar(&o.out, "out", "", "file the users' map is written to as JSON every second and at exit (default: stdout at exit)")
	flag.Float64Var(&idleSeconds, "until-idle", 0, "exit after this many seconds without a message (0: run until SIGTERM)")
	var settleSeconds float64
	flag.Float64Var(&settleSeconds, "settle", 2, "least seconds between the TRANSITIONS snapshot and the STATE end offsets the bootstrap reads to")
	flag.Parse()
	o.untilIdle = time.Duration(idleSeconds * float64(time.Second))
	o.settle = time.Duration(settleSeconds * float64(time.Second))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, o); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, o options) error {
	seeds := strings.Split(o.bootstrap, ",")
	admin, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	if err != nil {
		return err
	}
	defer admin.Close()
	adm := kadm.NewClient(admin)

	p := NewPresence()
	if o.queryURL != "" {
		p.repairer = queryRepairer(o.queryURL)
	}

	// Step 1: TRANSITIONS' end offsets, before STATE is read.
	t0, err := endOffsets(ctx, adm, o.transitions)
	if err != nil {
		return err
	}
	snapshot := time.Now()
	// Step 2: STATE from the beginning to its end offsets, taken after step 1 and at least the settle time
	// after it (docs/consuming.md: a transition and its STATE record reach Kafka a few milliseconds apart).
	s1, err := endOffsets(ctx, adm, o.state)
	if err != nil {
		return err
	}
	started := time.Now()
	reader, err := newStateReader(seeds, o.state, s1)
	if err != nil {
		return err
	}
	if err := reader.readTo(ctx, s1, p); err != nil {
		return err
	}
	if wait := o.settle - time.Since(snapshot); wait > 0 {
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if s1, err = endOffsets(ctx, adm, o.state); err != nil {
		return err
	}
	if err := reader.readTo(ctx, s1, p); err != nil {
		return err
	}
	reader.client.Close()
	log.Printf("bootstrapped %d users from %s in %s (%d records, %d tombstones)", len(p.Users), o.state,
		time.Since(started).Round(time.Millisecond), p.Stats.StateRecords, p.Stats.StateTombstones)

	// Step 3: TRANSITIONS from the step-1 offsets.
	start := map[int32]kgo.Offset{}
	positions := map[int32]int64{}
	for partition, offset := range t0 {
		start[partition] = kgo.NewOffset().At(offset)
		positions[partition] = offset
	}
	follower, err := kgo.NewClient(
		kgo.SeedBrokers(seeds...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{o.transitions: start}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
	)
	if err != nil {
		return err
	}
	defer follower.Close()

	lastMessage := time.Now()
	lastWrite := time.Time{}
	lastForget := time.Now()
	for {
		pollCtx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		fetches := follower.PollFetches(pollCtx)
		cancel()
		if ctx.Err() != nil {
			break
		}
		for _, fetchErr := range fetches.Errors() {
			if !errors.Is(fetchErr.Err, context.DeadlineExceeded) && !errors.Is(fetchErr.Err, context.Canceled) {
				// An offset out of range means we fell past retention: bootstrap again (docs/consuming.md).
				return fmt.Errorf("fetching %s[%d]: %w", fetchErr.Topic, fetchErr.Partition, fetchErr.Err)
			}
		}
		fetches.EachRecord(func(r *kgo.Record) {
			var t Transition
			if err := json.Unmarshal(r.Value, &t); err != nil {
				log.Printf("skipping an undecodable transition at %d@%d: %v", r.Partition, r.Offset, err)
			} else {
				p.CheckID(ceID(r.Headers), ceID(r.Headers) == fmt.Sprintf("%s:%d:%d", t.UserID, t.Epoch, t.Seq))
				p.ApplyTransition(t)
			}
			positions[r.Partition] = r.Offset + 1
			lastMessage = time.Now()
		})
		if time.Since(lastForget) >= time.Hour {
			p.ForgetOldEndedEpochs()
			lastForget = time.Now()
		}
		if o.out != "" && time.Since(lastWrite) >= time.Second {
			if err := write(o.out, p, positions); err != nil {
				return err
			}
			lastWrite = time.Now()
		}
		if o.untilIdle > 0 && time.Since(lastMessage) >= o.untilIdle {
			break
		}
	}
	return write(o.out, p, positions)
}

func endOffsets(ctx context.Context, adm *kadm.Client, topic string) (map[int32]int64, error) {
	listed, err := adm.ListEndOffsets(ctx, topic)
	if err != nil {
		return nil, fmt.Errorf("end offsets of %s: %w", topic, err)
	}
	if err := listed.Error(); err != nil {
		return nil, fmt.Errorf("end offsets of %s: %w", topic, err)
	}
	ends := map[int32]int64{}
	listed.Each(func(o kadm.ListedOffset) { ends[o.Partition] = o.Offset })
	if len(ends) == 0 {
		return nil, fmt.Errorf("topic %s has no partitions (does it exist?)", topic)
	}
	return ends, nil
}

// stateReader reads STATE from the beginning; the records it reads past a target are applied too (they are newer
// truth, and the transitions they reflect are dropped as repeats when TRANSITIONS is followed).
type stateReader struct {
	client    *kgo.Client
	positions map[int32]int64 // next offset per partition
}

func newStateReader(seeds []string, topic string, partitions map[int32]int64) (*stateReader, error) {
	start := map[int32]kgo.Offset{}
	positions := map[int32]int64{}
	for partition := range partitions {
		start[partition] = kgo.NewOffset().AtStart()
		positions[partition] = 0
	}
	client, err := kgo.NewClient(
		kgo.SeedBrokers(seeds...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: start}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
	)
	if err != nil {
		return nil, err
	}
	return &stateReader{client, positions}, nil
}

// readTo reads until every partition's position has reached its offset in ends.
func (s *stateReader) readTo(ctx context.Context, ends map[int32]int64, p *Presence) error {
	reached := func() bool {
		for partition, end := range ends {
			if s.positions[partition] < end {
				return false
			}
		}
		return true
	}
	for !reached() {
		fetches := s.client.PollFetches(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errs := fetches.Errors(); len(errs) > 0 {
			return fmt.Errorf("reading %s[%d]: %w", errs[0].Topic, errs[0].Partition, errs[0].Err)
		}
		var applyErr error
		fetches.EachRecord(func(r *kgo.Record) {
			if err := p.ApplyState(string(r.Key), r.Value, ceID(r.Headers)); err != nil && applyErr == nil {
				applyErr = err
			}
			// The active segment is never compacted, so the record at end-1 is always there to be read.
			s.positions[r.Partition] = r.Offset + 1
		})
		if applyErr != nil {
			return applyErr
		}
	}
	return nil
}

type dump struct {
	Consumer     string           `json:"consumer"`
	Bootstrapped bool             `json:"bootstrapped"`
	Users        map[string]Entry `json:"users"`
	Positions    map[string]int64 `json:"positions"`
	Stats        Stats            `json:"stats"`
	Gaps         []Gap            `json:"gaps"`
}

func write(path string, p *Presence, positions map[int32]int64) error {
	keys := make([]int, 0, len(positions))
	for partition := range positions {
		keys = append(keys, int(partition))
	}
	sort.Ints(keys)
	named := map[string]int64{}
	for _, partition := range keys {
		named[strconv.Itoa(partition)] = positions[int32(partition)]
	}
	gaps := p.Gaps
	if gaps == nil {
		gaps = []Gap{}
	}
	data, err := json.Marshal(dump{"go", true, p.Users, named, p.Stats, gaps})
	if err != nil {
		return err
	}
	if path == "" {
		_, err = os.Stdout.Write(append(data, '\n'))
		return err
	}
	// Written to a temporary file and renamed, so a reader never sees half a map.
	tmp, err := os.CreateTemp(filepath.Dir(path), ".presence-consumer-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
