-- A templated .sql file: a dollar-quoted function body and a BEGIN ATOMIC body survive splitting.
create function {{ dag_run.conf['schema'] }}.twice(x int) returns int language plpgsql as $$
begin
    return x * 2;  -- a semicolon inside the body
end $$;
create function {{ dag_run.conf['schema'] }}.thrice(x int) returns int language sql
begin atomic
    select x * 3;
end;
insert into {{ dag_run.conf['schema'] }}.marks values (1);
