// streamgen media players: the live fragmented-MP4 stream (docs/protocol.md, `segment` messages) to the screen.
//
// WebCodecs first: the fragments are demuxed here, fed to a VideoDecoder tuned for latency, and each decoded
// frame is drawn on a canvas at its own time, so nothing waits in a media buffer. Media Source Extensions
// (ManagedMediaSource on iOS Safari 17.1+) otherwise. Both report every frame they display by its number in the
// stream (`onDisplayed(frame)`), which is what the page and benchmarks/interaction.py measure latency with.
"use strict";

const MAX_LAG_S = 3; // further behind the live edge than this (a hidden tab), playback jumps forward
const LAG_AFTER_JUMP_S = 0.5; // ...to this far behind it
const KEEP_BEHIND_S = 20; // MSE: played video kept in the source buffer; older is removed
// Catching up with the live edge. A late chunk stalls playback, and after it the page would stay that much further
// behind the stream (and every control change would show that much later) for good. So the least a player held
// buffered over each window, less a margin, is time it no longer needs: it plays CATCH_UP_RATE times as fast
// (smoothly, no frame skipped) until that time is made up.
const CATCH_UP_WINDOW_MS = 1500; // about two chunks: the buffer is lowest just before each chunk arrives
const CATCH_UP_MARGIN_S = 0.1;
const CATCH_UP_RATE = 1.25;

class CatchUp {
  constructor() {
    this.low = Infinity; // least buffered in this window
    this.debt = 0; // seconds still to make up
    this.since = this.last = performance.now();
  }

  // The playback rate from `now` on, given the seconds buffered ahead; the rate it returned last has made up
  // (rate - 1) x the seconds since.
  rate(ahead, now) {
    if (this.debt > 0) this.debt -= ((CATCH_UP_RATE - 1) * (now - this.last)) / 1000;
    this.last = now;
    this.low = Math.min(this.low, ahead);
    if (now - this.since > CATCH_UP_WINDOW_MS) {
      this.debt = Math.max(0, this.low - CATCH_UP_MARGIN_S);
      this.low = Infinity;
      this.since = now;
    }
    return this.debt > 0 ? CATCH_UP_RATE : 1;
  }
}

// -- fragmented MP4 ------------------------------------------------------------------------------------------
// Just what the server's own fragments use (streamgen/media.py FragmentedMp4Encoder: one H.264 track, ftyp+moov
// with empty_moov, then moof+mdat pairs with tfdt and a trun carrying sizes and flags), read per ISO/IEC 14496-12,
// so another muxer's fragments with the same features also parse. Anything malformed throws.
const CONTAINERS = new Set(["moov", "trak", "mdia", "minf", "stbl", "mvex", "moof", "traf"]);

function boxes(view, start = 0, end = view.byteLength) {
  const found = [];
  for (let at = start; at < end;) {
    if (at + 8 > end) throw new Error(`MP4: truncated box header at byte ${at}`);
    let size = view.getUint32(at), header = 8;
    const type = String.fromCharCode(...new Uint8Array(view.buffer, view.byteOffset + at + 4, 4));
    if (size === 1) {
      size = Number(view.getBigUint64(at + 8));
      header = 16;
    } else if (size === 0) size = end - at; // extends to the end
    if (size < header || at + size > end) throw new Error(`MP4: box '${type}' at byte ${at} overruns its parent`);
    found.push({ type, start: at, body: at + header, end: at + size });
    at += size;
  }
  return found;
}

// The first box along `path` (e.g. ["moov", "trak", "mdia"]) under [start, end), or undefined.
function find(view, path, start = 0, end = view.byteLength) {
  let box = { body: start, end };
  for (const type of path) {
    box = boxes(view, box.body, box.end).find((b) => b.type === type);
    if (!box) return undefined;
  }
  return box;
}

function require(box, what) {
  if (!box) throw new Error(`MP4: no '${what}' box`);
  return box;
}

// Init segment -> what a decoder needs: the avcC record, the picture size, the track's timescale and defaults.
function parseInit(buffer) {
  const view = new DataView(buffer);
  const trak = require(find(view, ["moov", "trak"]), "trak");
  const mdhd = require(find(view, ["mdia", "mdhd"], trak.body, trak.end), "mdhd");
  const timescale = view.getUint32(mdhd.body + (view.getUint8(mdhd.body) === 1 ? 20 : 12));
  const stsd = require(find(view, ["mdia", "minf", "stbl", "stsd"], trak.body, trak.end), "stsd");
  const entry = boxes(view, stsd.body + 8, stsd.end)[0]; // full box header + entry_count, then the sample entry
  if (!entry || !["avc1", "avc3"].includes(entry.type)) throw new Error(`MP4: not H.264 (${entry?.type})`);
  const width = view.getUint16(entry.body + 24), height = view.getUint16(entry.body + 26);
  const avcC = require(find(view, ["avcC"], entry.body + 78, entry.end), "avcC"); // after the visual sample entry
  const trex = find(view, ["moov", "mvex", "trex"]);
  return {
    description: new Uint8Array(buffer.slice(avcC.body, avcC.end)),
    width, height, timescale,
    duration: trex ? view.getUint32(trex.body + 12) : 0,
    flags: trex ? view.getUint32(trex.body + 20) : 0,
  };
}

const isKey = (flags) => !(flags & 0x10000); // sample_is_non_sync_sample clear

// One or more moof+mdat -> samples: {data, timestamp and duration in microseconds, key}.
function parseFragments(buffer, init) {
  const view = new DataView(buffer), samples = [], us = 1e6 / init.timescale;
  for (const moof of boxes(view).filter((b) => b.type === "moof")) {
    for (const traf of boxes(view, moof.body, moof.end).filter((b) => b.type === "traf")) {
      const tfhd = require(find(view, ["tfhd"], traf.body, traf.end), "tfhd");
      const tfhdFlags = view.getUint32(tfhd.body) & 0xffffff;
      if (tfhdFlags & 0x1) throw new Error("MP4: explicit base data offsets are not supported");
      let at = tfhd.body + 8, duration = init.duration, size = 0, flags = init.flags;
      if (tfhdFlags & 0x2) at += 4; // sample description index
      if (tfhdFlags & 0x8) (duration = view.getUint32(at)), (at += 4);
      if (tfhdFlags & 0x10) (size = view.getUint32(at)), (at += 4);
      if (tfhdFlags & 0x20) flags = view.getUint32(at);
      const tfdt = require(find(view, ["tfdt"], traf.body, traf.end), "tfdt");
      const at64 = view.getUint8(tfdt.body) === 1;
      let time = at64 ? Number(view.getBigUint64(tfdt.body + 4)) : view.getUint32(tfdt.body + 4);
      let data = moof.start; // default-base-is-moof (and the first track's base without it)
      for (const trun of boxes(view, traf.body, traf.end).filter((b) => b.type === "trun")) {
        const version = view.getUint8(trun.body), trunFlags = view.getUint32(trun.body) & 0xffffff;
        const count = view.getUint32(trun.body + 4);
        at = trun.body + 8;
        if (trunFlags & 0x1) (data = moof.start + view.getInt32(at)), (at += 4);
        let first = trunFlags & 0x4 ? view.getUint32(at) : null;
        if (trunFlags & 0x4) at += 4;
        for (let i = 0; i < count; i++) {
          let d = duration, s = size, f = first ?? flags, offset = 0;
          if (trunFlags & 0x100) (d = view.getUint32(at)), (at += 4);
          if (trunFlags & 0x200) (s = view.getUint32(at)), (at += 4);
          if (trunFlags & 0x400) (f = view.getUint32(at)), (at += 4);
          if (trunFlags & 0x800) (offset = version ? view.getInt32(at) : view.getUint32(at)), (at += 4);
          if (at > trun.end || data + s > buffer.byteLength) throw new Error("MP4: trun overruns its data");
          first = null;
          samples.push({
            data: new Uint8Array(buffer, data, s), timestamp: Math.round((time + offset) * us),
            duration: Math.round(d * us), key: isKey(f),
          });
          data += s;
          time += d;
        }
      }
    }
  }
  return samples;
}

// -- WebCodecs --------------------------------------------------------------------------------------------------
// Decoded frames wait in a short queue and are drawn when their time comes on a clock anchored to the first frame;
// when the queue runs dry the clock waits for the next frame (a stall, never a skip) and then catches up (CatchUp),
// and a backlog over MAX_LAG_S (a hidden tab) is dropped.
class WebCodecsPlayer {
  static supported() {
    return typeof VideoDecoder === "function" && typeof EncodedVideoChunk === "function";
  }

  constructor(canvas, codec, fps, onDisplayed, onError) {
    Object.assign(this, { canvas, codec, fps, onDisplayed, onError });
    this.context = canvas.getContext("2d");
    this.init = null;
    this.frames = []; // decoded, not yet drawn, in timestamp order
    this.origin = null; // performance.now() at which timestamp 0 is due
    this.needKey = true;
    this.drawn = 0;
    this.catchUp = new CatchUp();
    this.rate = 1; // the clock's speed since the last refresh
    this.refreshed = performance.now();
    this.decoder = new VideoDecoder({ output: (frame) => this.frames.push(frame), error: (e) => onError(e.message) });
    this.tick = this.tick.bind(this);
    this.timer = requestAnimationFrame(this.tick);
  }

  append(buffer, header) {
    if (header.kind === "init") {
      this.init = parseInit(buffer);
      Object.assign(this.canvas, { width: this.init.width, height: this.init.height });
      this.decoder.configure({
        codec: this.codec, description: this.init.description, optimizeForLatency: true,
        codedWidth: this.init.width, codedHeight: this.init.height,
      });
      this.needKey = true;
      return;
    }
    for (const sample of parseFragments(buffer, this.init)) {
      if (this.needKey && !sample.key) continue; // a decoder starts at a key frame
      this.needKey = false;
      this.decoder.decode(new EncodedVideoChunk({
        type: sample.key ? "key" : "delta", timestamp: sample.timestamp, duration: sample.duration, data: sample.data,
      }));
    }
  }

  tick() {
    this.timer = requestAnimationFrame(this.tick);
    const now = performance.now();
    if (this.origin !== null) this.origin -= (this.rate - 1) * (now - this.refreshed); // faster: frames due sooner
    this.refreshed = now;
    this.rate = this.catchUp.rate(this.ahead, now);
    if (this.frames.length && (this.origin === null || this.due(this.frames[0]) < now - 1000 / this.fps)) {
      this.origin = now - this.frames[0].timestamp / 1000; // first frame, or after a stall: show it now
    }
    if (this.ahead > MAX_LAG_S) {
      while (this.ahead > LAG_AFTER_JUMP_S) this.frames.shift().close();
      this.origin = now - this.frames[0].timestamp / 1000;
    }
    let frame = null;
    while (this.frames.length && this.due(this.frames[0]) <= now) {
      frame?.close(); // due in the same display refresh as a later one: never shown
      frame = this.frames.shift();
    }
    if (!frame) return;
    this.context.drawImage(frame, 0, 0, this.canvas.width, this.canvas.height);
    this.drawn += 1;
    this.onDisplayed(Math.round((frame.timestamp * this.fps) / 1e6));
    frame.close();
  }

  due(frame) {
    return this.origin + frame.timestamp / 1000;
  }

  get ahead() {
    const last = this.frames.at(-1);
    return last ? (last.timestamp - this.frames[0].timestamp) / 1e6 + 1 / this.fps : 0;
  }

  get played() {
    return this.drawn;
  }

  close() {
    cancelAnimationFrame(this.timer);
    if (this.decoder.state !== "closed") this.decoder.close();
    this.frames.forEach((frame) => frame.close());
    this.frames = [];
  }
}

// -- Media Source Extensions --------------------------------------------------------------------------------
class MsePlayer {
  static source() {
    return window.ManagedMediaSource ?? window.MediaSource; // iOS Safari 17.1+ has only the managed one
  }

  static supported(codec) {
    return Boolean(MsePlayer.source()?.isTypeSupported(`video/mp4; codecs="${codec}"`));
  }

  constructor(video, codec, fps, onDisplayed) {
    Object.assign(this, { video, fps, onDisplayed });
    const Source = MsePlayer.source();
    this.media = new Source();
    this.buffer = null;
    this.pending = [];
    this.pump = this.pump.bind(this);
    video.disableRemotePlayback = true; // ManagedMediaSource plays only with AirPlay off (or an alternative)
    video.src = URL.createObjectURL(this.media);
    this.media.addEventListener("sourceopen", () => {
      URL.revokeObjectURL(video.src);
      this.buffer = this.media.addSourceBuffer(`video/mp4; codecs="${codec}"`);
      this.buffer.mode = "segments"; // fragments carry their own timestamps
      this.buffer.addEventListener("updateend", this.pump);
      this.pump();
    }, { once: true });
    this.catchUp = new CatchUp();
    if (video.requestVideoFrameCallback) {
      const onFrame = (now, meta) => {
        if (this.media === null) return;
        video.playbackRate = this.catchUp.rate(this.ahead, performance.now());
        onDisplayed(Math.round(meta.mediaTime * fps));
        video.requestVideoFrameCallback(onFrame);
      };
      video.requestVideoFrameCallback(onFrame);
    }
  }

  append(buffer) {
    this.pending.push(buffer);
    this.pump();
  }

  // Appends one queued fragment at a time (a SourceBuffer takes one operation at a time), trims played video.
  pump() {
    const { buffer, media, video } = this;
    if (!buffer || buffer.updating || media.readyState !== "open") return;
    if (buffer.buffered.length && video.currentTime - buffer.buffered.start(0) > 2 * KEEP_BEHIND_S) {
      buffer.remove(0, video.currentTime - KEEP_BEHIND_S); // its updateend pumps again
      return;
    }
    const data = this.pending.shift();
    if (data) buffer.appendBuffer(data);
    if (!buffer.buffered.length) return;
    const end = buffer.buffered.end(buffer.buffered.length - 1);
    if (end - video.currentTime > MAX_LAG_S) video.currentTime = end - LAG_AFTER_JUMP_S;
    if (video.paused) video.play().catch(() => {});
  }

  get ahead() {
    const buffered = this.video.buffered;
    return buffered.length ? Math.max(0, buffered.end(buffered.length - 1) - this.video.currentTime) : 0;
  }

  get played() {
    return this.video.getVideoPlaybackQuality?.().totalVideoFrames ?? 0;
  }

  close() {
    this.media = null;
    this.pending = [];
  }
}

// The player for a new stream: WebCodecs unless the browser lacks it (or H.264 in it) or `prefer` is "mse".
// Throws when neither can play `codec`.
async function createPlayer({ canvas, video, codec, fps, prefer, onDisplayed, onError }) {
  const webcodecs = prefer !== "mse" && WebCodecsPlayer.supported()
    && (await VideoDecoder.isConfigSupported({ codec, optimizeForLatency: true })).supported;
  canvas.hidden = !webcodecs;
  video.hidden = webcodecs;
  if (webcodecs) return new WebCodecsPlayer(canvas, codec, fps, onDisplayed, onError);
  if (!MsePlayer.supported(codec)) throw new Error(`This browser cannot play video/mp4; codecs="${codec}".`);
  return new MsePlayer(video, codec, fps, onDisplayed);
}
