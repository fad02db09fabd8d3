"""The Redis side of docs/algorithms.md: one Lua script that settles a batch of steps atomically,
the commands that run it and the parsing of its reply.

The script is a transcription of ``algorithms`` (check every step, admit the batch when every
binding step passes, charge each step by its algorithm's rule; or undo a charge when asked to
refund); the property tests hold it to the in-memory store's answers. It is sent as EVALSHA and,
when the server answers NOSCRIPT (a restart, SCRIPT FLUSH, a new cluster node), once more as EVAL,
which also loads it. Only the command tuples are built here: any client that can send a command
and return its reply in place can run them. All keys of one call must live on one server (in a
cluster, one slot): callers group them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.algorithms import Step, StepResult

# KEYS: one per step. ARGV[1]: integers separated by spaces (one argument is cheaper to send
# than many): now (µs), refund (0/1), then per step algorithm, hits, limit, p1, p2, ttl, flags
# (1: conditional, 2: binding). Reply: per step admitted, charged, a, b.
# Big integers are written with %d: Lua's own number formatting would use an exponent.
SETTLE_LUA = """
local v = {}
for word in string.gmatch(ARGV[1], '%S+') do v[#v + 1] = tonumber(word) end
local now = v[1]
local refund = v[2] == 1
local n = #KEYS
local algo, hits, limit, p1, p2, ttl, cond, bind = {}, {}, {}, {}, {}, {}, {}, {}
for i = 1, n do
  local j = 2 + (i - 1) * 7
  algo[i] = v[j + 1]
  hits[i] = v[j + 2]
  limit[i] = v[j + 3]
  p1[i] = v[j + 4]
  p2[i] = v[j + 5]
  ttl[i] = v[j + 6]
  local flags = v[j + 7]
  cond[i] = flags % 2 == 1
  bind[i] = flags >= 2
end
if refund then
  for i = 1, n do
    local key = KEYS[i]
    if algo[i] == 1 then
      local h = redis.call('HMGET', key, 's', 'c')
      if tonumber(h[1]) == p1[i] then
        redis.call('HSET', key, 'c', math.max(0, tonumber(h[2]) - hits[i]))
      end
    elseif algo[i] == 2 then
      local tat = tonumber(redis.call('GET', key))
      if tat then
        redis.call('SET', key, string.format('%d', tat - hits[i] * p1[i]), 'KEEPTTL')
      end
    else
      local count = tonumber(redis.call('GET', key))
      if count then
        redis.call('DECRBY', key, math.min(count, hits[i]))
      end
    end
  end
  return {}
end
local ok, a, b = {}, {}, {}
local all = true
for i = 1, n do
  local key = KEYS[i]
  if algo[i] == 1 then
    local h = redis.call('HMGET', key, 's', 'c', 'p')
    local s = tonumber(h[1])
    local c, p = 0, 0
    if s == p1[i] then
      c, p = tonumber(h[2]), tonumber(h[3])
    elseif s == p1[i] - p2[i] then
      p = tonumber(h[2])
    end
    local w = math.floor(p * (p2[i] - (now - p1[i])) / p2[i])
    ok[i] = w + c + hits[i] <= limit[i]
    a[i], b[i] = c, p
  elseif algo[i] == 2 then
    local tat = tonumber(redis.call('GET', key)) or 0
    if tat < now then tat = now end
    ok[i] = tat + hits[i] * p1[i] - now <= p2[i]
    a[i], b[i] = tat, 0
  else
    local c = tonumber(redis.call('GET', key)) or 0
    ok[i] = c + hits[i] <= limit[i]
    a[i], b[i] = c, 0
  end
  if bind[i] and not ok[i] then all = false end
end
local out = {}
for i = 1, n do
  local charged = (all or not cond[i]) and (ok[i] or algo[i] == 0)
  if charged then
    local key = KEYS[i]
    if algo[i] == 1 then
      redis.call('HSET', key, 's', string.format('%d', p1[i]), 'c', a[i] + hits[i], 'p', b[i])
      redis.call('PEXPIRE', key, math.floor(2 * p2[i] / 1000) + ttl[i] * 1000)
    elseif algo[i] == 2 then
      local tat = a[i] + hits[i] * p1[i]
      local px = math.floor((tat - now) / 1000) + ttl[i] * 1000
      redis.call('SET', key, string.format('%d', tat), 'PX', px)
    else
      redis.call('INCRBY', key, hits[i])
      redis.call('EXPIRE', key, ttl[i])
    end
  end
  out[#out + 1] = ok[i] and 1 or 0
  out[#out + 1] = charged and 1 or 0
  out[#out + 1] = a[i]
  out[#out + 1] = b[i]
end
return out
"""

SETTLE_SHA = hashlib.sha1(SETTLE_LUA.encode()).hexdigest()

Command = tuple[str | int, ...]


def _arguments(steps: Sequence[Step], now: int, refund: bool) -> list[str | int]:
    args: list[str | int] = [len(steps)]
    args.extend(step.key for step in steps)
    words = [f"{now} {1 if refund else 0}"]
    for s in steps:
        flags = (1 if s.conditional else 0) + (2 if s.binding else 0)
        words.append(f"{s.algorithm:d} {s.hits} {s.limit} {s.p1} {s.p2} {s.ttl} {flags}")
    args.append(" ".join(words))
    return args


def evalsha(steps: Sequence[Step], now: int, *, refund: bool = False) -> Command:
    return ("EVALSHA", SETTLE_SHA, *_arguments(steps, now, refund))


def eval_(steps: Sequence[Step], now: int, *, refund: bool = False) -> Command:
    return ("EVAL", SETTLE_LUA, *_arguments(steps, now, refund))


def parse(reply: Any, count: int, where: str) -> list[StepResult]:
    """The script's flat reply (integers) → one ``StepResult`` per step."""
    if (
        not isinstance(reply, list)
        or len(reply) != 4 * count
        or not all(type(value) is int for value in reply)
    ):
        raise BackendError(f"redis: unexpected reply to the settle script from {where}")
    return [
        StepResult(reply[i] == 1, reply[i + 1] == 1, reply[i + 2], reply[i + 3])
        for i in range(0, len(reply), 4)
    ]
