package io.presence.examples;

import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicBoolean;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.WakeupException;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

/**
 * The reference Java consumer of the presence topics (docs/consuming.md).
 *
 * <p>Bootstraps every user's status from the compacted STATE topic, then follows TRANSITIONS from the end offsets
 * taken before the bootstrap, deduplicating by (epoch, seq) and repairing gaps from the query API. Keeps a map
 * userid -> {status, epoch, seq} and writes it as JSON to {@code -out} every second and at exit (SIGTERM, SIGINT,
 * or {@code -until-idle} seconds without a message).
 */
public final class PresenceConsumer {
  private static final ObjectMapper JSON =
      new ObjectMapper().configure(DeserializationFeature.FAIL_ON_UNKNOWN_PROPERTIES, false);

  /** What the consumer knows of one user: the status TRANSITIONS has shown last and its number. */
  record Entry(String status, long epoch, long seq) {}

  /** The fields of a transitions.v1 message this consumer uses; unknown fields are ignored (schema policy). */
  record Transition(String userid, String from, String to, long epoch, long seq, String causeEvent) {
    static Transition of(JsonNode node) {
      return new Transition(
          node.path("userid").asText(),
          node.path("from").asText(),
          node.path("to").asText(),
          node.path("epoch").asLong(),
          node.path("seq").asLong(),
          node.path("cause").path("event").asText());
    }
  }

  /**
   * How long an ended epoch is remembered: TRANSITIONS' retention (PRESENCE_TOPIC_TRANSITIONS_RETENTION_MS, 7
   * days). No repeat of a transition can arrive later than that after the consumer saw its epoch end, so the entry
   * can then be forgotten (docs/consuming.md, "Epochs").
   */
  static final Duration ENDED_EPOCH_RETENTION = Duration.ofDays(7);

  /** The users' map and the rule of docs/consuming.md, step 4. */
  static final class Presence {
    final Map<String, Entry> users = new HashMap<>();
    // userid -> every epoch a tombstone or a "deleted" transition ended -> when the consumer saw it end. A set, not
    // the last one: an ended record never becomes current again, but the user's next record may have a larger or a
    // smaller epoch, and after a worker restart the repeats of several ended epochs may arrive while the user has a
    // newer record. It is kept when the user comes back, for the same reason.
    final Map<String, Map<Long, Instant>> ended = new HashMap<>();
    final Map<String, Integer> stats = new TreeMap<>();
    final List<Map<String, Object>> gaps = new ArrayList<>();
    QueryApi repairer;

    Presence() {
      for (String name :
          List.of(
              "state_records", "state_tombstones", "applied", "repeats", "new_epochs", "deletions",
              "stale_of_deleted", "gaps", "repairs", "repair_failures", "ids_checked", "id_mismatches")) {
        stats.put(name, 0);
      }
    }

    private void count(String name) {
      stats.merge(name, 1, Integer::sum);
    }

    /**
     * Counts a ce_id header (docs/consuming.md, "Headers") that does not name what the value says: TRANSITIONS
     * "userid:epoch:seq" exactly, a STATE value that followed by ":digest", a tombstone "userid:epoch:seq:deleted".
     */
    void checkId(String id, boolean ok) {
      count("ids_checked");
      if (!ok) {
        count("id_mismatches");
        System.err.println("ce_id " + id + " does not match its message");
      }
    }

    void applyState(String key, byte[] value, String id) throws IOException {
      if (value == null) {
        checkId(id, id.startsWith(key + ":") && id.endsWith(":deleted"));
        forget(key);
        count("state_tombstones");
        return;
      }
      JsonNode node = JSON.readTree(value);
      checkId(id, id.startsWith(key + ":" + node.path("epoch").asLong() + ":" + node.path("seq").asLong() + ":"));
      users.put(
          key,
          new Entry(node.path("status").asText(), node.path("epoch").asLong(), node.path("seq").asLong()));
      count("state_records");
    }

    void applyTransition(Transition t) {
      Entry cur = users.get(t.userid());
      boolean deleted = "deleted".equals(t.causeEvent());
      if (isEnded(t.userid(), t.epoch())) {
        // A late transition, or a repeat, of a record already deleted: whether or not the user has a record now,
        // an ended record never becomes current again.
        count("stale_of_deleted");
        return;
      }
      if (cur == null && deleted) {
        count("repeats"); // the deletion of a user already forgotten
        return;
      }
      if (cur == null && t.seq() == 1) {
        count("new_epochs");
      } else if (cur != null && t.epoch() == cur.epoch() && t.seq() <= cur.seq()) {
        count("repeats");
        return;
      } else if (cur != null
          && t.epoch() == cur.epoch()
          && t.seq() == cur.seq() + 1
          && t.from().equals(cur.status())) {
        // the next change
      } else if (cur != null && t.epoch() != cur.epoch() && t.seq() == 1) {
        count("new_epochs");
      } else {
        count("gaps");
        if (gaps.size() < 100) {
          Map<String, Object> gap = new HashMap<>();
          gap.put("userid", t.userid());
          gap.put("had", cur);
          gap.put("got", new Entry(t.to(), t.epoch(), t.seq()));
          gap.put("from", t.from());
          gaps.add(gap);
        }
        set(t, deleted);
        repair(t.userid());
        return;
      }
      set(t, deleted);
    }

    /**
     * Whether {@code epoch} is one of the user's ended epochs. Epochs are compared for equality only: a smaller
     * epoch than an ended one may be a new record (docs/consuming.md, "Epochs").
     */
    boolean isEnded(String userid, long epoch) {
      return ended.getOrDefault(userid, Map.of()).containsKey(epoch);
    }

    /**
     * Removes the user (a tombstone, a "deleted" transition, or a 404 from the query API) and remembers the epoch
     * of the record that ended.
     */
    private void forget(String userid) {
      Entry cur = users.remove(userid);
      if (cur != null) {
        endEpoch(userid, cur.epoch());
      }
    }

    private void endEpoch(String userid, long epoch) {
      ended.computeIfAbsent(userid, k -> new HashMap<>()).put(epoch, Instant.now());
    }

    /** Drops the ended epochs seen end more than ENDED_EPOCH_RETENTION ago, so users who never come back go. */
    void forgetOldEndedEpochs() {
      Instant oldest = Instant.now().minus(ENDED_EPOCH_RETENTION);
      ended.values().forEach(epochs -> epochs.values().removeIf(seen -> seen.isBefore(oldest)));
      ended.values().removeIf(Map::isEmpty);
    }

    private void set(Transition t, boolean deleted) {
      count("applied");
      if (deleted) {
        count("deletions");
        users.remove(t.userid());
        endEpoch(t.userid(), t.epoch());
        return;
      }
      users.put(t.userid(), new Entry(t.to(), t.epoch(), t.seq()));
    }

    /** After a gap, take the user's record from the query API (404: unknown, i.e. offline). */
    private void repair(String userid) {
      if (repairer == null) {
        return;
      }
      try {
        Entry entry = repairer.get(userid);
        count("repairs");
        if (entry == null) {
          forget(userid);
        } else {
          users.put(userid, entry);
        }
      } catch (IOException | InterruptedException e) {
        count("repair_failures");
        System.err.println("repair of " + userid + " failed: " + e);
      }
    }
  }

  /** GET /presence/{userid} of the worker's query API. */
  static final class QueryApi {
    private final HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();
    private final String base;

    QueryApi(String base) {
      this.base = base.replaceAll("/+$", "");
    }

    Entry get(String userid) throws IOException, InterruptedException {
      String path = URLEncoder.encode(userid, StandardCharsets.UTF_8).replace("+", "%20");
      HttpRequest request =
          HttpRequest.newBuilder(URI.create(base + "/presence/" + path)).timeout(Duration.ofSeconds(10)).build();
      for (int attempt = 0; ; attempt++) {
        HttpResponse<byte[]> response = http.send(request, HttpResponse.BodyHandlers.ofByteArray());
        if (response.statusCode() == 404) {
          return null;
        }
        if (response.statusCode() == 200) {
          JsonNode node = JSON.readTree(response.body());
          return new Entry(node.path("status").asText(), node.path("epoch").asLong(), node.path("seq").asLong());
        }
        if (response.statusCode() == 503 && attempt < 20) {
          Thread.sleep(500); // partitions are being reassigned: the API says retry
          continue;
        }
        throw new IOException("query API answered " + response.statusCode());
      }
    }
  }

  private static Map<String, String> parseArgs(String[] args) {
    Map<String, String> options = new HashMap<>();
    options.put("bootstrap", "127.0.0.1:9092");
    options.put("transitions", "presence.transitions");
    options.put("state", "presence.state");
    options.put("query-url", "");
    options.put("out", "");
    options.put("until-idle", "0");
    options.put("settle", "2");
    for (int i = 0; i < args.length; i++) {
      String name = args[i].replaceFirst("^--?", "");
      if (!options.containsKey(name) || i + 1 >= args.length) {
        System.err.println(
            "usage: PresenceConsumer [-bootstrap HOST:PORT] [-transitions TOPIC] [-state TOPIC]"
                + " [-query-url URL] [-out FILE] [-until-idle SECONDS] [-settle SECONDS]");
        System.exit(2);
      }
      options.put(name, args[++i]);
    }
    return options;
  }

  private static KafkaConsumer<byte[], byte[]> consumer(String bootstrap) {
    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    // No group: partitions are assigned by hand and nothing is committed; the map is rebuilt at every start.
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "none");
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    return new KafkaConsumer<>(props);
  }

  private static List<TopicPartition> partitions(KafkaConsumer<?, ?> consumer, String topic) {
    List<PartitionInfo> infos = consumer.partitionsFor(topic, Duration.ofSeconds(30));
    if (infos == null || infos.isEmpty()) {
      throw new IllegalStateException("topic " + topic + " has no partitions (does it exist?)");
    }
    List<TopicPartition> out = new ArrayList<>();
    for (PartitionInfo info : infos) {
      out.add(new TopicPartition(topic, info.partition()));
    }
    return out;
  }

  public static void main(String[] args) throws Exception {
    Map<String, String> options = parseArgs(args);
    String bootstrap = options.get("bootstrap");
    Path out = options.get("out").isEmpty() ? null : Path.of(options.get("out"));
    long idleMs = (long) (Double.parseDouble(options.get("until-idle")) * 1000);
    long settleMs = (long) (Double.parseDouble(options.get("settle")) * 1000);
    Presence presence = new Presence();
    if (!options.get("query-url").isEmpty()) {
      presence.repairer = new QueryApi(options.get("query-url"));
    }

    Map<TopicPartition, Long> positions = new HashMap<>();
    try (KafkaConsumer<byte[], byte[]> state = consumer(bootstrap);
        KafkaConsumer<byte[], byte[]> follower = consumer(bootstrap)) {
      // Step 1: TRANSITIONS' end offsets, before STATE is read.
      List<TopicPartition> transitions = partitions(follower, options.get("transitions"));
      Map<TopicPartition, Long> t0 = follower.endOffsets(transitions);
      long snapshot = System.nanoTime();
      // Step 2: STATE from the beginning to its end offsets, taken after step 1 and at least the settle time
      // after it (docs/consuming.md: a transition and its STATE record reach Kafka a few milliseconds apart).
      List<TopicPartition> statePartitions = partitions(state, options.get("state"));
      long started = System.nanoTime();
      state.assign(statePartitions);
      state.seekToBeginning(statePartitions);
      readStateTo(state, state.endOffsets(statePartitions), presence);
      long waitMs = settleMs - (System.nanoTime() - snapshot) / 1_000_000;
      if (waitMs > 0) {
        Thread.sleep(waitMs);
      }
      readStateTo(state, state.endOffsets(statePartitions), presence);
      System.err.printf(
          "bootstrapped %d users from %s in %d ms (%d records, %d tombstones)%n",
          presence.users.size(), options.get("state"), (System.nanoTime() - started) / 1_000_000,
          presence.stats.get("state_records"), presence.stats.get("state_tombstones"));

      // Step 3: TRANSITIONS from the step-1 offsets.
      follower.assign(transitions);
      for (TopicPartition tp : transitions) {
        follower.seek(tp, t0.get(tp));
        positions.put(tp, t0.get(tp));
      }
      AtomicBoolean stopping = new AtomicBoolean(false);
      CountDownLatch done = new CountDownLatch(1);
      Thread main = Thread.currentThread();
      Runtime.getRuntime()
          .addShutdownHook(
              new Thread(
                  () -> {
                    stopping.set(true);
                    follower.wakeup();
                    try {
                      done.await(); // let the main thread write the final map before the JVM exits
                    } catch (InterruptedException e) {
                      main.interrupt();
                    }
                  }));
      long lastMessage = System.currentTimeMillis();
      long lastWrite = 0;
      long lastForget = System.currentTimeMillis();
      try {
        while (!stopping.get()) {
          for (ConsumerRecord<byte[], byte[]> r : follower.poll(Duration.ofMillis(500))) {
            try {
              Transition t = Transition.of(JSON.readTree(r.value()));
              String id = ceId(r);
              presence.checkId(id, id.equals(t.userid() + ":" + t.epoch() + ":" + t.seq()));
              presence.applyTransition(t);
            } catch (IOException e) {
              System.err.println("skipping an undecodable transition at " + r.partition() + "@" + r.offset());
            }
            positions.put(new TopicPartition(r.topic(), r.partition()), r.offset() + 1);
            lastMessage = System.currentTimeMillis();
          }
          if (System.currentTimeMillis() - lastForget >= Duration.ofHours(1).toMillis()) {
            presence.forgetOldEndedEpochs();
            lastForget = System.currentTimeMillis();
          }
          if (out != null && System.currentTimeMillis() - lastWrite >= 1000) {
            write(out, presence, positions);
            lastWrite = System.currentTimeMillis();
          }
          if (idleMs > 0 && System.currentTimeMillis() - lastMessage >= idleMs) {
            break;
          }
        }
      } catch (WakeupException e) {
        // SIGTERM or SIGINT: write the map below.
      } finally {
        write(out, presence, positions);
        done.countDown();
      }
    }
  }

  /** The message's CloudEvents id header, "" if it has none. */
  private static String ceId(ConsumerRecord<byte[], byte[]> r) {
    Header header = r.headers().lastHeader("ce_id");
    return header == null ? "" : new String(header.value(), StandardCharsets.UTF_8);
  }

  /**
   * Reads STATE until every partition's position has reached {@code ends}: the position, not the last record
   * seen, since compaction removes offsets. Records read past a target are newer truth and applied too.
   */
  private static void readStateTo(
      KafkaConsumer<byte[], byte[]> state, Map<TopicPartition, Long> ends, Presence presence) throws IOException {
    List<TopicPartition> remaining = new ArrayList<>(ends.keySet());
    remaining.removeIf(tp -> state.position(tp) >= ends.get(tp));
    while (!remaining.isEmpty()) {
      for (ConsumerRecord<byte[], byte[]> r : state.poll(Duration.ofMillis(500))) {
        presence.applyState(new String(r.key(), StandardCharsets.UTF_8), r.value(), ceId(r));
      }
      remaining.removeIf(tp -> state.position(tp) >= ends.get(tp));
    }
  }

  private static void write(Path out, Presence presence, Map<TopicPartition, Long> positions)
      throws IOException {
    ObjectNode dump = JSON.createObjectNode();
    dump.put("consumer", "java");
    dump.put("bootstrapped", true);
    dump.set("users", JSON.valueToTree(presence.users));
    Map<String, Long> named = new TreeMap<>();
    positions.forEach((tp, offset) -> named.put(Integer.toString(tp.partition()), offset));
    dump.set("positions", JSON.valueToTree(named));
    dump.set("stats", JSON.valueToTree(presence.stats));
    dump.set("gaps", JSON.valueToTree(presence.gaps));
    byte[] data = JSON.writeValueAsBytes(dump);
    if (out == null) {
      System.out.write(data);
      System.out.println();
      System.out.flush();
      return;
    }
    // Written to a temporary file and renamed, so a reader never sees half a map.
    Path tmp = Files.createTempFile(out.toAbsolutePath().getParent(), ".presence-consumer-", ".json");
    Files.write(tmp, data);
    Files.move(tmp, out, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
  }
}
