-- wrk script: POST one prepared body. Usage: wrk ... -s bench/post.lua URL -- BODY_FILE CONTENT_TYPE
init = function(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*all")
  f:close()
  wrk.headers["Content-Type"] = args[2]
end
