-- GET /key/{h} (the path given on the wrk command line); every reply must be a 200.
done = function(summary, latency, requests)
   io.write(string.format("non2xx=%d\n", summary.errors.status))
end
