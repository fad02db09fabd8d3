-- Identity injection for the rate-limit filter that runs after this one.
--
-- Derives the caller's identity from `Authorization: Bearer <token>` and sets two request headers
-- that the route's rate_limits actions turn into descriptor entries:
--   x-ext-auth-ratelimit  the client id: "client-" followed by the FNV-1a (32-bit) hash of the
--                         token in hex, or "anonymous" when there is no bearer token. Hashing keeps
--                         the token itself out of the rate-limit service: its Redis keys, its logs
--                         and its stats only ever see the id.
--   x-ext-auth-plan       "premium" for tokens that start with "premium-" (an API key whose prefix
--                         names its kind, like sk_live_...), else "free".
-- Both headers are always replaced, so a client cannot pick someone else's bucket by sending
-- them itself. The token is not verified here: in production put jwt_authn or ext_authz before
-- this filter (or use the verified JWT's `sub`); docs/demo.md explains the WASM alternative.

local FNV_OFFSET_BASIS = 0x811c9dc5

-- FNV-1a over the bytes of s, with LuaJIT's 32-bit `bit` operations. The multiplication by the
-- FNV prime 16777619 = 2^24 + 403 is split in two so that no intermediate exceeds 2^53.
local function fnv1a32(s)
  local h = bit.tobit(FNV_OFFSET_BASIS)
  for i = 1, #s do
    h = bit.bxor(h, s:byte(i))
    h = bit.tobit(bit.lshift(h, 24) + h * 403)
  end
  return bit.tohex(h)
end

local function bearer_token(headers)
  local authorization = headers:get("authorization")
  if authorization == nil then
    return nil
  end
  local token = authorization:match("^[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")
  return token
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local token = bearer_token(headers)
  local client, plan = "anonymous", "free"
  if token ~= nil then
    client = "client-" .. fnv1a32(token)
    if token:sub(1, 8) == "premium-" then
      plan = "premium"
    end
  end
  headers:replace("x-ext-auth-ratelimit", client)
  headers:replace("x-ext-auth-plan", plan)
end
